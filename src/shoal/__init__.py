"""shoal: grow new language models out of existing ones.

Classic merges, evolutionary merge search (arXiv 2403.13187) and Transformer²
self-adaptation (arXiv 2501.06252), on any Hugging Face causal LM.
"""

from shoal.errors import ShoalError
from shoal.flow.registration import register_if_transformers_loaded as _register_layer_path

# Plain AutoModelForCausalLM.from_pretrained loads layer-path folders after `import shoal` when
# transformers' Auto model classes are already loaded; otherwise `import shoal` stays free of
# torch and transformers (see shoal.flow.registration for the trade-off).
_register_layer_path()

__version__ = "0.1.0"
__all__ = ["ShoalError", "__version__"]
