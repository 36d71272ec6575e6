"""Table 1's rows (§5.1; Table 1a, 1b, 1d): the paper's AP of each, and the train.py flags that make it on the
dense set. endpoint.py trains them; its tables put each beside the paper's, relative to FL γ = 2.

A row's family (CE or FL) decides which learning rate it takes: the one chosen for (b) CE with the prior,
or for (d) FL γ = 2 (endpoint.chosen).
"""
CE, FL = ("--gamma", "0", "--alpha", "none"), ("--alpha", "0.25")
ROWS = {  # name -> (loss, the paper's row, its AP, that table's FL γ = 2 AP, family, train.py flags); §5.1
    "a": ("CE, bias 0 (no prior)", "§3.3: diverges", None, 34.0, "CE", [*CE, "--prior", "0.5"]),
    "b": ("CE, prior π = .01", "§3.3 (= Table 1a α = .5 ×2)", 30.2, 34.0, "CE", [*CE]),
    "c.25": ("α-CE, α = .25", "Table 1a", 10.8, 34.0, "CE", ["--gamma", "0", "--alpha", "0.25"]),
    "c.5": ("α-CE, α = .5", "Table 1a", 30.2, 34.0, "CE", ["--gamma", "0", "--alpha", "0.5"]),
    "c": ("α-CE, α = .75", "Table 1a, 1b γ = 0", 31.1, 34.0, "CE", ["--gamma", "0", "--alpha", "0.75"]),
    "c.9": ("α-CE, α = .9", "Table 1a", 30.8, 34.0, "CE", ["--gamma", "0", "--alpha", "0.9"]),
    "e0.5": ("FL γ = .5, α = .5", "Table 1b", 32.9, 34.0, "FL", ["--gamma", "0.5", "--alpha", "0.5"]),
    "e1": ("FL γ = 1, α = .25", "Table 1b", 33.7, 34.0, "FL", ["--gamma", "1", *FL]),
    "d": ("FL γ = 2, α = .25", "Table 1b", 34.0, 34.0, "FL", ["--gamma", "2", *FL]),
    "e5": ("FL γ = 5, α = .25", "Table 1b", 32.2, 34.0, "FL", ["--gamma", "5", *FL]),
    "g": ("OHEM, no ratio, 128, NMS .5", "Table 1d (R101)", 32.8, 36.0, "CE", [*CE, "--ohem", "inf"]),
    "f": ("OHEM 1:3, 128, NMS .5", "Table 1d (R101)", 31.1, 36.0, "CE", [*CE, "--ohem", "3"]),
}
SEEDS = {"b": 3, "c": 3, "d": 3}  # the others: 2
# The order the table's runs go in: (b) and (d) first, then the rows the issue would cut last if the study ran
# over its 12 hours (cut first: e0.5, then e5, the α grid, OHEM 1:3), so that a budget that runs out cuts them.
ORDER = ("b", "d", "c", "e1", "a", "g", "f", "c.9", "c.5", "c.25", "e5", "e0.5")
