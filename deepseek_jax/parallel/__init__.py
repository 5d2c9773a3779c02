"""Scale-out: the mesh, the one logical-axis rules table, and expert-parallel MoE dispatch.

    mesh.py     make_mesh: ("data", "fsdp", "expert", "tensor"), Auto axes, unnamed = 1
    rules.py    the rules table; NamedShardings for params, optimizer state, cache, activations
    expert.py   MoE dispatch by shard_map all-to-all over "expert" (paper 2.2.2-2.2.4)
    plan.py     per-device memory and all-to-all bytes, without allocating the model

Kept light (no re-exports) because model/moe.py imports parallel.expert while the model
package is still importing.
"""
