"""Scale-out: the mesh, the one logical-axis rules table, and expert-parallel MoE dispatch.

    mesh.py       make_mesh: ("data", "fsdp", "expert", "tensor"), Auto axes, unnamed = 1
    rules.py      the rules table: logical axes -> PartitionSpecs (a leaf: imports nothing)
    placement.py  NamedShardings for params, optimizer state (ZeRO-1) and the latent cache
    expert.py     MoE dispatch by shard_map all-to-all over "expert" (paper 2.2.2-2.2.4)
    hlo.py        costs read from a compiled program: all-to-all bytes, FLOPs per scope
    plan.py       per-device memory, traffic and expert FLOPs, planned and compiled

Import order: rules <- model (activation specs) <- expert <- model.moe; placement and plan
sit above the model. No re-exports here, so that importing one module loads only its own.
"""
