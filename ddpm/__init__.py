"""DDPM on Fashion-MNIST in MindSpore: the model, the diffusion process, data and training."""

from ddpm.runtime import apply_env_defaults

# Must precede the first `import mindspore`: MindSpore reads these when it loads.
apply_env_defaults()
