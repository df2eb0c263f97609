"""Tensor, expert and data parallelism on torch.distributed (NCCL on GPUs, gloo on CPUs).

config.py  ParallelConfig: sizes and their SGLang meanings, checked
layout.py  which rank holds which slice/expert of every tensor (data; checked vs a plan)
comm.py    process groups, collectives, the rank-0 -> all control channel
layers.py  row/vocab-parallel layers and `parallelize` (a built model -> one rank's part)
moe.py     expert-parallel token dispatchers around SparseMoE's expert compute
workers.py the rank processes of a TP group (rank 0 = the engine), multi-node
dp.py      data-parallel replicas behind one server
report.py  the per-rank layout, logged by rank 0 and printed by `mixq inspect`
"""
