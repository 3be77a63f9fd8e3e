"""Token Expansion (ToE, CVPR 2024): accelerate ViT training by growing the token set over stages.

    import toe
    schedule = toe.Schedule(r1=0.5, ng=3, k=2, epochs=300)
    toe.apply(model, schedule)          # patches block 1's input at run time
    for epoch in range(300):
        toe.set_epoch(model, epoch)
        ...
"""
from .ops import token_expansion
from .patch import apply, current_rates, is_applied, last_assignment, last_index, remove, set_epoch
from .schedule import Schedule

__all__ = ["Schedule", "token_expansion", "apply", "remove", "set_epoch", "is_applied", "current_rates",
           "last_index", "last_assignment"]
