package org.trashsort.core

import kotlin.math.ceil

/** An 8-bit RGB image, row-major, 3 bytes per pixel (R, G, B). */
class RgbImage(val width: Int, val height: Int, val pixels: ByteArray) {
    init {
        require(pixels.size == width * height * 3) { "expected ${width * height * 3} bytes, got ${pixels.size}" }
    }

    fun at(x: Int, y: Int, channel: Int): Int = pixels[(y * width + x) * 3 + channel].toInt() and 0xFF

    companion object {
        /** From Android's ARGB_8888 ints (Bitmap.getPixels); alpha is dropped. */
        fun fromArgb(argb: IntArray, width: Int, height: Int): RgbImage {
            require(argb.size == width * height) { "expected ${width * height} pixels, got ${argb.size}" }
            val out = ByteArray(width * height * 3)
            for (i in argb.indices) {
                val p = argb[i]
                out[i * 3] = (p shr 16).toByte()
                out[i * 3 + 1] = (p shr 8).toByte()
                out[i * 3 + 2] = p.toByte()
            }
            return RgbImage(width, height, out)
        }
    }
}

/** The model's input tensor, in the dtype the artefact declares. */
sealed class InputTensor {
    class Bytes(val data: ByteArray, val dtype: String) : InputTensor()
    class Floats(val data: FloatArray) : InputTensor()
}

/**
 * The input contract of the Python pipeline (edge/preprocess.py), bit for bit:
 * resize the shorter side with Pillow's resampling (a port of its two-pass, fixed-point convolution),
 * then center-crop with Python's rounding. Normalization stays in the graph unless the manifest says not.
 */
object Preprocessor {
    private const val PRECISION_BITS = 32 - 8 - 2

    /** Camera pixels -> model input, as the manifest and the artefact's input tensor say. */
    fun toInput(argb: IntArray, width: Int, height: Int, manifest: Manifest, input: TensorInfo): InputTensor =
        toInput(RgbImage.fromArgb(argb, width, height), manifest.preprocess, input)

    fun toInput(image: RgbImage, pre: Preprocess, input: TensorInfo): InputTensor {
        val crop = centerCrop(resizeShorter(image, pre.resizeShorterTo, pre.interpolation), pre.height, pre.width)
        return encode(crop, pre, input)
    }

    /** uint8 as is; int8 through the tensor's quantization (scale 1, zero point -128 for ours); float32 as
     * 0..255 when normalization is in the graph, else normalized with the manifest's mean/std. */
    fun encode(crop: RgbImage, pre: Preprocess, input: TensorInfo): InputTensor {
        val n = crop.pixels.size
        return when (input.dtype) {
            "uint8" -> InputTensor.Bytes(crop.pixels.copyOf(), "uint8")
            "int8" -> {
                val q = input.quantization ?: Quantization(1.0, -128)
                InputTensor.Bytes(ByteArray(n) { i ->
                    val v = Math.rint((crop.pixels[i].toInt() and 0xFF) / q.scale + q.zeroPoint).toInt()
                    v.coerceIn(-128, 127).toByte()
                }, "int8")
            }
            "float32" -> InputTensor.Floats(FloatArray(n) { i ->
                val v = (crop.pixels[i].toInt() and 0xFF).toFloat()
                if (pre.input.normalizedInGraph) v else {
                    val c = i % 3
                    ((v / 255.0 - pre.input.mean[c]) / pre.input.std[c]).toFloat()
                }
            })
            else -> throw IllegalArgumentException("input dtype ${input.dtype} is not one this app can feed")
        }
    }

    /** torchvision's Resize(int) rule: the shorter side to [shorter], the longer scaled and truncated. */
    fun resizeShorter(image: RgbImage, shorter: Int, interpolation: String): RgbImage {
        val (w, h) = image.width to image.height
        val (outW, outH) = if (w <= h) shorter to (shorter.toLong() * h / w).toInt()
        else (shorter.toLong() * w / h).toInt() to shorter
        if (outW == w && outH == h) return image
        return resize(image, outW, outH, interpolation)
    }

    /** Center crop with Python's round() of the offsets (half to even), as edge/preprocess.py. */
    fun centerCrop(image: RgbImage, height: Int, width: Int): RgbImage {
        require(image.width >= width && image.height >= height) {
            "image ${image.width}x${image.height} is smaller than the crop ${width}x$height"
        }
        val top = Math.rint((image.height - height) / 2.0).toInt()
        val left = Math.rint((image.width - width) / 2.0).toInt()
        val out = ByteArray(width * height * 3)
        for (y in 0 until height) {
            System.arraycopy(image.pixels, ((top + y) * image.width + left) * 3, out, y * width * 3, width * 3)
        }
        return RgbImage(width, height, out)
    }

    /** Pillow's Image.resize for 8-bit RGB with a convolution filter (bilinear or bicubic). */
    fun resize(image: RgbImage, outW: Int, outH: Int, interpolation: String): RgbImage {
        val filter = when (interpolation) {
            "bilinear" -> Filter.BILINEAR
            "bicubic" -> Filter.BICUBIC
            else -> throw IllegalArgumentException("interpolation '$interpolation' is not supported on Android yet")
        }
        val vert = Coefficients.compute(image.height, outH, filter)
        val yFirst = vert.bounds[0]
        val yLast = vert.bounds[(outH - 1) * 2] + vert.bounds[(outH - 1) * 2 + 1]
        var current = image
        var rowOffset = 0
        if (outW != image.width) {
            val horiz = Coefficients.compute(image.width, outW, filter)
            current = convolve(image, outW, yLast - yFirst, horiz, horizontal = true, rowOffset = yFirst)
            rowOffset = yFirst  // the horizontal pass kept only the rows the vertical pass reads
        }
        if (outH != image.height) {
            current = convolve(current, current.width, outH, vert, horizontal = false, rowOffset = rowOffset)
        }
        return current
    }

    private enum class Filter(val support: Double) {
        BILINEAR(1.0) {
            override fun weight(x: Double): Double { val a = Math.abs(x); return if (a < 1.0) 1.0 - a else 0.0 }
        },
        BICUBIC(2.0) {
            override fun weight(x: Double): Double {
                val a = -0.5
                val t = Math.abs(x)
                return when {
                    t < 1.0 -> ((a + 2.0) * t - (a + 3.0)) * t * t + 1
                    t < 2.0 -> (((t - 5) * t + 8) * t - 4) * a
                    else -> 0.0
                }
            }
        };

        abstract fun weight(x: Double): Double
    }

    /** Pillow's precompute_coeffs + normalize_coeffs_8bpc: per output pixel, a first input index,
     * a count and fixed-point weights. */
    private class Coefficients(val ksize: Int, val bounds: IntArray, val weights: IntArray) {
        companion object {
            fun compute(inSize: Int, outSize: Int, filter: Filter): Coefficients {
                val scale = inSize.toDouble() / outSize
                val filterScale = maxOf(scale, 1.0)
                val support = filter.support * filterScale
                val ksize = ceil(support).toInt() * 2 + 1
                val bounds = IntArray(outSize * 2)
                val weights = IntArray(outSize * ksize)
                val k = DoubleArray(ksize)
                for (xx in 0 until outSize) {
                    val center = (xx + 0.5) * scale
                    val ss = 1.0 / filterScale
                    val xmin = maxOf((center - support + 0.5).toInt(), 0)
                    val xmax = minOf((center + support + 0.5).toInt(), inSize) - xmin
                    var ww = 0.0
                    for (x in 0 until xmax) {
                        k[x] = filter.weight((x + xmin - center + 0.5) * ss)
                        ww += k[x]
                    }
                    for (x in 0 until ksize) {
                        val v = if (x < xmax && ww != 0.0) k[x] / ww else if (x < xmax) k[x] else 0.0
                        weights[xx * ksize + x] =
                            if (v < 0) (-0.5 + v * (1 shl PRECISION_BITS)).toInt()
                            else (0.5 + v * (1 shl PRECISION_BITS)).toInt()
                    }
                    bounds[xx * 2] = xmin
                    bounds[xx * 2 + 1] = xmax
                }
                return Coefficients(ksize, bounds, weights)
            }
        }
    }

    private fun clip8(sum: Int): Byte = (sum shr PRECISION_BITS).coerceIn(0, 255).toByte()

    /** One pass of Pillow's two-pass resize: along x ([horizontal]) or y. Output row yy reads input row
     * yy + [rowOffset] in the horizontal pass; the vertical pass's bounds are shifted by [rowOffset]. */
    private fun convolve(image: RgbImage, outW: Int, outH: Int, c: Coefficients, horizontal: Boolean,
                         rowOffset: Int): RgbImage {
        val out = ByteArray(outW * outH * 3)
        for (yy in 0 until outH) {
            for (xx in 0 until outW) {
                val along = if (horizontal) xx else yy
                val first = c.bounds[along * 2] - if (horizontal) 0 else rowOffset
                val count = c.bounds[along * 2 + 1]
                val kBase = along * c.ksize
                var s0 = 1 shl (PRECISION_BITS - 1)
                var s1 = s0
                var s2 = s0
                for (i in 0 until count) {
                    val p = if (horizontal) ((yy + rowOffset) * image.width + first + i) * 3
                    else ((first + i) * image.width + xx) * 3
                    val w = c.weights[kBase + i]
                    s0 += (image.pixels[p].toInt() and 0xFF) * w
                    s1 += (image.pixels[p + 1].toInt() and 0xFF) * w
                    s2 += (image.pixels[p + 2].toInt() and 0xFF) * w
                }
                val o = (yy * outW + xx) * 3
                out[o] = clip8(s0)
                out[o + 1] = clip8(s1)
                out[o + 2] = clip8(s2)
            }
        }
        return RgbImage(outW, outH, out)
    }
}
