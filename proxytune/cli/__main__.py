"""`python -m proxytune.cli ...`: how DVC's stages and `accelerate launch` start the command."""

from proxytune.cli import main

main()
