"""The `fuser` logger, switched on the way Dynamo's and Inductor's are:

    TORCH_LOGS="fuser" python train.py                        # each rewrite and near miss, one line each
    TORCH_LOGS="+fuser"                                       # ... and debug detail
    torch._logging.set_logs(modules={"fuser": logging.INFO})  # the same from Python

Every module logs under "fuser." (`logging.getLogger(__name__)`), so the one registered name covers them;
off (WARNING) unless asked for.
"""
import torch._logging._internal as torch_logging

NAME = "fuser"
torch_logging.register_log(NAME, NAME)
