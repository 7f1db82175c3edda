"""A program every torchrun rank runs (tests/test_tensor_parallel.py launches it): the engine on
rank 0 writes its tokens as JSON to OUT; on the other ranks EFTEngine(...) serves rank 0's steps
and exits when rank 0 closes. With FAIL_AT, rank 1's FAIL_AT-th knowledge forward raises, and
rank 0 writes the error it gets instead.

    python -m torch.distributed.run ... tests/tp_launched.py KNOWLEDGE_DIR OUT [FAIL_AT]
"""
import json
import os
import sys

import torch

from eft_fast import EFTEngine
from eft_fast.engine.parallel.group import TensorParallelError
from tp_common import fail_knowledge_forward, requests, small_models, tokenizer

if __name__ == "__main__":
    torch.set_num_threads(1)
    knowledge_dir, out = sys.argv[1], sys.argv[2]
    if len(sys.argv) > 3 and os.environ["RANK"] == "1":
        fail_knowledge_forward(int(sys.argv[3]))
    tok = tokenizer()
    tuned, reference = small_models(tok)
    try:
        with EFTEngine(knowledge=knowledge_dir, tuned=tuned[0], reference=reference, tokenizer=tok, block_size=4,
                       backend="torch", tensor_parallel_size=2, distributed_timeout_s=60) as engine:
            assert os.environ["RANK"] == "0", "only rank 0 gets past EFTEngine(...)"
            result = [o.token_ids for o in engine.generate(*requests(len(tok)))]
    except TensorParallelError as e:
        result = {"error": str(e)}
    with open(out, "w") as f:
        json.dump(result, f)
