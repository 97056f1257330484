"""The toy world: procedural 64x64 scenes, held-out subjects, and models pretrained on them.

world.py renders scenes from attributes and writes captions; subjects.py holds the held-out subjects
and their photo shoots; oracle.py reads attributes back off any image; pretrain.py trains the base
models; builtins.py resolves the shipped names (toy-sd, toy-llamagen, toy-clip, toy-dino, toy-oracle).
"""
