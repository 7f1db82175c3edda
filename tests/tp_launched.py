"""A program every torchrun rank runs (tests/test_tensor_parallel.py launches it): the engine on
rank 0 writes its tokens as JSON to OUT; on the other ranks EFTEngine(...) serves rank 0's steps
and exits when rank 0 closes.

    python -m torch.distributed.run ... tests/tp_launched.py KNOWLEDGE_DIR OUT
"""
import json
import os
import sys

import torch

from eft_fast import EFTEngine
from tp_common import requests, small_models, tokenizer

if __name__ == "__main__":
    torch.set_num_threads(1)
    knowledge_dir, out = sys.argv[1], sys.argv[2]
    tok = tokenizer()
    tuned, reference = small_models(tok)
    with EFTEngine(knowledge=knowledge_dir, tuned=tuned[0], reference=reference, tokenizer=tok, block_size=4,
                   backend="torch", tensor_parallel_size=2, distributed_timeout_s=60) as engine:
        assert os.environ["RANK"] == "0", "only rank 0 gets past EFTEngine(...)"
        outputs = engine.generate(*requests(len(tok)))
    with open(out, "w") as f:
        json.dump([o.token_ids for o in outputs], f)
