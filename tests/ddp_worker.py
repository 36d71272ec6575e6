"""Started by torchrun from test_train.py: runs train.main, then every rank saves the weights it holds."""
import os
import sys

import torch

import train

if __name__ == "__main__":
    args = train.get_args_parser().parse_args(sys.argv[1:])
    model = train.main(args)["model"]
    torch.save(model.state_dict(), os.path.join(args.out, f"rank{os.environ['RANK']}.pt"))
