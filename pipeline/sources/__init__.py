"""Dataset layouts, one small module each, all yielding (uid, image_bytes, captions)."""
