"""ardetect: autoregressive density models that detect adversarial images by bits per dimension."""

from ardetect._malloc import tune_malloc

tune_malloc()
