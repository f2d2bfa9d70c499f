"""Plain deterministic networks behind a registry.

A net factory takes the data's shape (``in_channels``, ``image_size``, ``num_classes``) plus keyword overrides
of its sizes, and returns an ``nn.Module`` mapping images ``(B, C, H, W)`` to logits ``(B, num_classes)``::

    net = create_net("lenet", in_channels=1, image_size=32, num_classes=10, channels=(8, 16, 120))

Besides the registered nets, any torchvision or timm classification model is a net by name: ``tv:NAME``
(``torchvision.models.get_model``) and ``timm:NAME`` (``timm.create_model``), built offline without pretrained
weights (the net option ``weights`` loads a local state-dict file). Every net also takes the model options
``deterministic`` and ``random``: selectors of modules to keep deterministic or make random (comma-separated
module names, patterns or class names; :mod:`pyrozoo.models.layers`).
"""

from pyrozoo.nets.registry import (  # noqa: F401
    DATA_SHAPE,
    MODEL_OPTIONS,
    NETS,
    PREFIXES,
    STARTS,
    NetEntry,
    create_net,
    model_options,
    net_options,
    register_net,
)
from pyrozoo.nets import lenet, mixer, mlp, resnet, vit  # noqa: E402,F401  (each registers its nets)
