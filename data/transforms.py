"""Image transforms of the input pipelines (TensorFlow ops inside tf.data maps): RGB, resize and
centre crop."""

TOO_SMALL = 'image smaller than data.resolution on its shorter side (upscaling is refused)'


def to_rgb(image):
  """[H, W, C] uint8 with C in (1, 3, 4) -> [H, W, 3]: grey repeated, alpha dropped."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels == 4:
    return image[..., :3]
  if channels != 3:
    raise ValueError(f'images with {channels} channels cannot be made RGB')
  return image


def to_square(image, resolution: int):
  """[H, W, C] uint8 -> [R, R, C] uint8: the shorter side resized to R (bicubic, antialiased),
  centre-cropped.

  An image whose shorter side is already R is only cropped (no resampling). One whose shorter side
  is smaller than R fails the map with TOO_SMALL: it could only be made square at R by upscaling.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  height, width = tf.shape(image)[0], tf.shape(image)[1]
  short = tf.minimum(height, width)
  tf.debugging.assert_greater_equal(short, resolution, message=TOO_SMALL)
  scale = resolution / tf.cast(short, tf.float64)
  new_height = tf.maximum(resolution,
                          tf.cast(tf.round(tf.cast(height, tf.float64) * scale), tf.int32))
  new_width = tf.maximum(
      resolution, tf.cast(tf.round(tf.cast(width, tf.float64) * scale), tf.int32))

  def resized():
    pixels = tf.image.resize(image, [new_height, new_width], method='bicubic', antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(pixels), 0, 255), tf.uint8)

  image = tf.cond(tf.equal(short, resolution), lambda: tf.cast(image, tf.uint8), resized)
  top, left = (new_height - resolution) // 2, (new_width - resolution) // 2
  square = image[top:top + resolution, left:left + resolution]  # [R, R, C]
  return tf.ensure_shape(square, [resolution, resolution, image.shape[-1]])
