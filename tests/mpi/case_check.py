"""A script whose case "second" fails on rank 1: the launcher's report must name it.
Usage: case_check.py"""

from common import WORLD, case, progress

rank = WORLD.Get_rank()
for step, name in enumerate(["first", "second", "third"]):
    with case(name):
        assert not (name == "second" and rank == 1), f"deliberate failure on rank {rank}"
    progress(step)
