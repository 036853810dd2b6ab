"""What to generate and how it is recorded, shared by sampling during training and the generation scripts: the
prompt language (`language`), sd-scripts' sampler names (`samplers`) and the PNG metadata (`png_metadata`)."""
