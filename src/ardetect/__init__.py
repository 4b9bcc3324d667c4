"""ardetect: autoregressive density models that detect adversarial images by bits per dimension."""
