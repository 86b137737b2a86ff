package org.trashsort.core

import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/** Golden vectors written by the Python pipeline (android_demo/write_golden.py): the same bytes in,
 * the same tensor out; the same logits in, the same probabilities and top-k out. */
class GoldenTest {
    private val dir = File(System.getProperty("trashsort.golden") ?: "build/golden")
    private val index = JSONObject(File(dir, "index.json").readText())
    private val manifest = Manifest.parse(File(dir, "manifest.json").readText())

    @Test
    fun preprocessingGivesThePipelinesTensorByteForByte() {
        val cases = index.getJSONArray("cases")
        assertTrue(cases.length() >= 20)
        for (i in 0 until cases.length()) {
            val c = cases.getJSONObject(i)
            val size = c.getJSONArray("size")
            val pre = manifest.preprocess.copy(height = size.getInt(0), width = size.getInt(1),
                cropPct = c.getDouble("crop_pct"), interpolation = c.getString("interpolation"))
            val pixels = readArgb(File(dir, c.getString("pixels")))
            val uint8 = TensorInfo("in", listOf(1, pre.height, pre.width, 3), "uint8", null)
            val got = Preprocessor.toInput(RgbImage.fromArgb(pixels, c.getInt("width"), c.getInt("height")), pre, uint8)
            val expected = File(dir, c.getString("name") + ".u8").readBytes()
            assertArrayEquals(c.getString("name"), expected, (got as InputTensor.Bytes).data)
            // The full-integer INT8 .tflite takes pixel - 128 (scale 1, zero point -128).
            val int8 = TensorInfo("in", uint8.shape, "int8", Quantization(1.0, -128))
            val shifted = (Preprocessor.toInput(RgbImage.fromArgb(pixels, c.getInt("width"), c.getInt("height")),
                pre, int8) as InputTensor.Bytes).data
            assertArrayEquals(ByteArray(expected.size) { ((expected[it].toInt() and 0xFF) - 128).toByte() }, shifted)
        }
    }

    @Test
    fun softmaxAndTopKMatchThePipeline() {
        val scores = index.getJSONArray("scores")
        for (i in 0 until scores.length()) {
            val s = scores.getJSONObject(i)
            val logits = s.getJSONArray("logits").let { a -> FloatArray(a.length()) { a.getDouble(it).toFloat() } }
            val probs = Scores.softmax(logits)
            val expected = s.getJSONArray("probs")
            for (j in probs.indices) assertEquals(expected.getDouble(j), probs[j], 1e-6)
            val top = Scores.topK(probs, manifest, 3)
            val ids = s.getJSONArray("top_k").let { a -> List(a.length()) { a.getInt(it) } }
            assertEquals(ids, top.map { it.classId })
            assertEquals(ids.map { manifest.classNames[it] }, top.map { it.name })
        }
    }

    private fun readArgb(file: File): IntArray {
        val buffer = ByteBuffer.wrap(file.readBytes()).order(ByteOrder.LITTLE_ENDIAN).asIntBuffer()
        return IntArray(buffer.remaining()).also { buffer.get(it) }
    }
}
