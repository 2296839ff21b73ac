"""Image-caption data: the built-in shapes (`shapes`), any image-caption source (`pairs`), image
transforms (`images`) and the exact-resume training order (`order`)."""
