"""`synthesis.compile`: the synthesis stage compiles the teacher's denoiser in place, with static shapes,
and the compiled pipeline writes the same proxies.

The compile runs on torch's "eager" backend (the test swaps it in): TorchDynamo captures the denoiser's
forward into graphs that then run on the same eager kernels, so the images must be byte-identical to
an uncompiled run's. This checks the wiring and that Dynamo captures the UNet inside the pipeline's
denoising loop; inductor's generated kernels (1/255 pixel differences measured, about 140 s to compile
tiny-sd on 2 cores) are what benchmarks/synthesis_throughput.py runs.
"""

import torch

from proxytune.images import list_images
from proxytune.stages import synthesis
from test_synthesis_features import with_teacher


def test_compiled_denoiser_writes_the_same_proxies(project, tmp_path, monkeypatch):
    compiled, original = [], torch.nn.Module.compile

    def compile_on_eager(module, **kwargs):
        compiled.append((type(module).__name__, kwargs))
        original(module, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch.nn.Module, "compile", compile_on_eager)
    folders = {}
    for on in (False, True):
        params = with_teacher(project, num_images=2, compile=on)
        folders[on] = tmp_path / f"compile-{on}"
        folders[on].mkdir()
        torch._dynamo.reset()
        synthesis.generate_missing(params, params.out("teacher"), folders[on])

    assert compiled == [("UNet2DConditionModel", {"dynamic": False})]
    eager, traced = (list_images(folders[on]) for on in (False, True))
    assert len(eager) == len(traced) == 2
    assert [p.read_bytes() for p in traced] == [p.read_bytes() for p in eager]
