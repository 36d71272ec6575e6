"""The Table 1 study (§5.1): the research machinery around the reference implementation, run through analyze.py.

    dense.py      the dense set (COCO's imbalance in 192-px pictures) and its training recipe
    pretrain.py   the ImageNet stand-in: a ResNet-18 pretrained on the dense set's crops
    table1.py     Table 1's rows (the paper's AP and the flags of each), the figure of their runs
    ablate.py     Table 1 with error bars after a short schedule, and the imbalance sweep
    endpoint.py   Table 1 at the endpoint: each loss family's LR chosen on held-out pictures, the ledger

Nothing of the detector, the loss or train.py imports this package: it trains through train.py like any
user, and only analyze.py and app.py, the front ends that show the study, import it.
"""
