"""The toy world: procedural 64x64 scenes, held-out subjects, and models pretrained on them.

world.py renders scenes from attributes and writes captions; subjects.py holds the held-out subjects
and their photo shoots; styles.py the rendering styles and their detector; oracle.py reads attributes back
off any image and judges.py turns its readings into per-image scores; pretrain.py trains the base models;
builtins.py resolves the shipped names (toy-sd, toy-llamagen, toy-clip, toy-dino, toy-oracle).

proxytune itself never imports this package: plugin.py registers the toy models and the world
(toy_world.py, a `proxytune.builtins.World`) through the `proxytune.plugins` entry point.
"""
