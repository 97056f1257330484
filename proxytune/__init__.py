"""proxytune: personalise autoregressive image generators through a diffusion teacher's proxy images."""

import logging

# diffusers imports torchao whenever it is installed (the `quantize` extra), and torchao then tries to
# load its compiled GPU kernels, logging a warning per kernel it cannot load (all of them on a CPU-only
# or other-Python install), torch's pytree deprecations of its enums and diffusers' note on torchao
# tensor classes it cannot import (they matter only for loading torchao-serialised checkpoints, which
# proxytune never does): noise on every command's stderr, while the int8 weight-only path proxytune uses
# is plain PyTorch. Errors still show.
for _name in ("torchao", "torch.utils._pytree", "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
