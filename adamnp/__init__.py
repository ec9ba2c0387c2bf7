"""adamnp: Adam/AdamW for plain arrays."""
