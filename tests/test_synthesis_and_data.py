"""Synthesis resumes without regenerating finished images, also after a full disk; DreamBench download from a local server."""

import http.server
import json
import os
import threading
from functools import partial

import pytest
from PIL import Image

from conftest import make_params, tiny_spec
from proxytune.backends.teachers import diffusion
from proxytune.files import sha256_file
from proxytune.stages import synthesis


@pytest.fixture
def teacher_adapter(project):
    """A real (untrained) teacher LoRA saved where the synthesis stage expects it."""
    params = make_params(project, tiny_spec(synthesis={"num_images": 5, "batch_size": 2, "num_inference_steps": 2}))
    pipe = diffusion.load_pipeline("tiny-sd")
    diffusion.add_lora(pipe.unet, rank=4, alpha=4, target_modules=["to_q", "to_v"])
    diffusion.save_lora(pipe, params.out("teacher") / "adapter")
    return params


def test_resume_keeps_finished_images_and_regenerates_partial_ones(teacher_adapter, tmp_path, monkeypatch):
    params = teacher_adapter
    full = tmp_path / "full"
    full.mkdir()
    synthesis.generate_missing(params, params.out("teacher"), full)

    calls = []
    real = diffusion.generate

    def crash_after_first_batch(pipe, prompts, seeds, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed mid-run, after two batches
        calls.append(seeds)
        return real(pipe, prompts, seeds, **kwargs)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    monkeypatch.setattr(diffusion, "generate", crash_after_first_batch)
    with pytest.raises(KeyboardInterrupt):
        synthesis.generate_missing(params, params.out("teacher"), resumed)
    assert sorted(p.name for p in resumed.glob("*.png")) == [f"{i:05d}.png" for i in range(4)]
    (resumed / "00003.png").write_bytes(b"\x89PNG truncated")  # a half-written file from an older crash

    seen = []
    monkeypatch.setattr(diffusion, "generate", lambda pipe, prompts, seeds, **kw: seen.append(seeds) or real(pipe, prompts, seeds, **kw))
    synthesis.generate_missing(params, params.out("teacher"), resumed)
    # seed = synthesis.seed + index; block [0, 1] is kept, block [2, 3] (holding the bad file) and [4] redone
    assert seen == [[2, 3], [4]]
    for i in range(5):
        assert sha256_file(resumed / f"{i:05d}.png") == sha256_file(full / f"{i:05d}.png")


def test_a_full_disk_in_a_stage_is_one_line_and_the_rerun_resumes(teacher_adapter, monkeypatch):
    import errno
    import tempfile

    from click.testing import CliRunner

    from proxytune.cli import main
    from proxytune.outputs import write_record

    params = teacher_adapter
    write_record(params.out("teacher"), {"model": "t.dog.teacher", "version": "1", "run_id": "0" * 32,
                                                "adapter_digest": sha256_file(params.out("teacher") / "adapter" / diffusion.LORA_WEIGHT_NAME)})
    real_mkstemp = tempfile.mkstemp

    def full_for_preview(*args, prefix=None, **kwargs):
        if prefix and prefix.startswith(".preview.png."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # the disk fills while the preview is written
        return real_mkstemp(*args, prefix=prefix, **kwargs)

    command = ["stage", "synthesis", "--params", str(params.path)]
    monkeypatch.setattr(tempfile, "mkstemp", full_for_preview)
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left on device" in errors[0] and "free some space" in errors[0], result.output
    assert errors[0].startswith("error: ") and f"/{params.subject_dir.name}/.proxy.staging-" in errors[0]
    assert errors[0].split(": ")[1].endswith("/preview.png")
    assert not params.out("proxy").exists() and not list(params.subject_dir.glob(".proxy.staging-*"))

    monkeypatch.setattr(tempfile, "mkstemp", real_mkstemp)  # space freed: the re-run only assembles the set
    monkeypatch.setattr(diffusion, "generate", lambda *a, **k: pytest.fail("finished images were generated again"))
    result = CliRunner().invoke(main, command)
    assert result.exit_code == 0, result.output
    assert (params.out("proxy") / "preview.png").exists() and len(list((params.out("proxy") / "images").iterdir())) == 5


def test_dreambench_download_from_a_local_server(tmp_path, monkeypatch):
    served = tmp_path / "served"
    (served / "dataset" / "dog").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(served / "dataset" / "dog" / "00.jpg")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    listing = [{"type": "file", "name": "00.jpg", "download_url": f"{base}/dataset/dog/00.jpg"},
               {"type": "file", "name": "README", "download_url": f"{base}/nope"}]
    (served / "listing-dog.json").write_text(json.dumps(listing))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("PROXYTUNE_DREAMBENCH_LISTING", base + "/listing-{name}.json")
        from proxytune import dreambench

        got = list(dreambench.download(tmp_path / "out", ["dog"]))
        assert got == [("dog", 1)]
        assert Image.open(tmp_path / "out" / "dog" / "00.jpg").size == (8, 8)
        from proxytune.errors import ProxytuneError

        with pytest.raises(ProxytuneError, match="unknown DreamBench subject"):
            list(dreambench.download(tmp_path / "out", ["unicorn"]))
    finally:
        server.shutdown()
