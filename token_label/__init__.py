"""Token labeling (LV-ViT): dense label maps, label-aware augmentation, the data sets and the loss.

Modules (each re-exported here, so ``import token_label`` gives the whole API):
  * ``token_label.maps``: the label-map file format, reading and validating files, format conversions;
  * ``token_label.augment``: the training transform moving the map with the image (flip, RandAugment,
    random resized crop with ``roi_align``);
  * ``token_label.dataset``: the image folder with a label map per image, synthetic maps, the builder;
  * ``token_label.loss``: targets and the token-labeling loss (class token + dense aux head).

Targets (``target=``):
  * "reference" (default; what LV-ViT's official token-labeling code does, and what produced Table 3):
    a location's logits are zero-filled to all C classes (listed classes get their logit, every other class
    0). The crop resamples this zero-filled map with ``roi_align`` over the crop box at full C, and the
    dense target is the softmax over all C classes. The class-token target is the same map pooled over the
    whole crop (``roi_align`` to 1 x 1), softmax over all C; with ``ground_truth=True`` it is mixed with the
    one-hot label as ``r * t + (1 - r) * gt``, r = 0.9 - 0.4 * [argmax t == label].
  * "topk" (this repository's earlier choice): the dense target is the softmax over the K listed values
    only (independent of C and of the teacher's logit scale); the class target is the one-hot label.
Label smoothing: every target built here becomes ``(1 - eps) * t + eps / C``.
"""
from models.lvvit import spread_to_positions  # re-exported: the helper the dense outputs are built with
from token_label.augment import (SPATIAL_OPS, LabelAwareRandAugment, TokenLabelTransform, affine_dense_map,
                                 crop_dense_map, spatial_op_matrix)
from token_label.dataset import SyntheticTokenLabels, TokenLabelImageFolder, build_token_label_dataset
from token_label.loss import (TokenLabelCriterion, TokenLabelCrossEntropy, class_logits, dense_targets,
                              mixtoken_lam, sparse_soft_ce)
from token_label.maps import (EMPTY, TARGETS, LabelMapError, dense_slots, dense_to_sparse, dense_to_topk,
                              label_path_for, load_label_map, scatter_logits, topk_to_dense)

__all__ = [
    "TARGETS", "EMPTY", "LabelMapError", "load_label_map", "label_path_for", "scatter_logits", "topk_to_dense",
    "dense_to_sparse", "dense_to_topk", "dense_slots", "crop_dense_map", "affine_dense_map",
    "spatial_op_matrix", "SPATIAL_OPS", "LabelAwareRandAugment", "TokenLabelTransform", "TokenLabelImageFolder",
    "SyntheticTokenLabels", "build_token_label_dataset", "dense_targets", "class_logits", "sparse_soft_ce",
    "mixtoken_lam", "TokenLabelCrossEntropy", "TokenLabelCriterion", "spread_to_positions",
]
