"""shoal: grow new language models out of existing ones.

Classic merges, evolutionary merge search (arXiv 2403.13187) and Transformer²
self-adaptation (arXiv 2501.06252), on any Hugging Face causal LM.
"""

from shoal.errors import ShoalError
from shoal.flow.registration import install as _install_layer_path_architecture

# transformers' AutoConfig / AutoModelForCausalLM learn the layer-path architecture
# (model_type "shoal_layer_path") when they are imported; this imports neither torch nor transformers.
_install_layer_path_architecture()

__version__ = "0.1.0"
__all__ = ["ShoalError", "__version__"]
