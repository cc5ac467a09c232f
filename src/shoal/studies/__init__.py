"""Experiments over the library (torchtune's recipes/library split): each study is a thin
workflow that calls the library and writes its numbers, and nothing in the library imports
this package.

- :mod:`shoal.studies.evolve_demo`: ``shoal demo`` -- an evolved merge on the miniature world
  with its controls (sources, the uniform merge, a uniform grid, the single-source control);
- :mod:`shoal.studies.svf_study` / :mod:`shoal.studies.svf_report`: ``shoal svf study`` --
  Transformer² experts, two-pass inference and z transfer on a zoo world;
- :mod:`shoal.studies.lora_baseline`: the PEFT LoRA baseline the SVF study compares with.
"""
