"""One module per ``edgescope`` subcommand, each with ``add(commands)`` (its parser) and ``run(args)``
(its exit status); ``options`` holds what several share. ``edgescope.cli`` puts them together.

Heavy imports happen inside ``run``, so ``--help`` is instant and ``serve`` never loads torch.
"""
