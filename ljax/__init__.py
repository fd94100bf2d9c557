"""ljax: lottery jackpots in JAX/Flax (Zhang et al., TPAMI 2023).

`search_jackpot(model, variables, batches, sparsity=0.9, epochs=...)` learns only a binary mask over
frozen pre-trained weights. Sparsity is the fraction of prunable weights removed (0.9 keeps 10%).
"""

from ljax.search import Jackpot, SearchOptions, search_jackpot

__all__ = ['Jackpot', 'SearchOptions', 'search_jackpot']
__version__ = '0.1.0'
