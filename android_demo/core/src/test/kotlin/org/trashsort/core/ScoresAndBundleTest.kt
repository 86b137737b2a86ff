package org.trashsort.core

import org.json.JSONObject
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.file.Files

class ScoresAndBundleTest {
    private val realText: String = javaClass.getResource("/manifest.json")!!.readText()
    private val manifest = Manifest.parse(realText)

    @Test
    fun uncertainBelowTheThresholdAndStreamsFromTheManifest() {
        val withStreams = JSONObject(realText)
        withStreams.getJSONArray("classes").getJSONObject(1).put("stream", "glass-bank")
        val m = Manifest.parse(withStreams.toString())
        val logits = floatArrayOf(0.1f, 2.0f, 1.9f, 0f, 0f, 0f)  // glass ~ metal: not sure
        val sure = Scores.answer(logits, m, k = 2, minConfidence = 0.2)
        assertFalse(sure.uncertain)
        assertEquals("glass", sure.label)
        assertEquals("glass-bank", sure.topK.first().stream)
        assertEquals(listOf("glass", "metal"), sure.topK.map { it.name })
        val unsure = Scores.answer(logits, m, k = 3, minConfidence = 0.5)
        assertTrue(unsure.uncertain)
        assertEquals(Answer.UNCERTAIN, unsure.label)
        assertEquals(3, unsure.topK.size)
    }

    @Test
    fun int8OutputsAreDequantized() {
        val out = TensorInfo("logits", listOf(1, 3), "int8", Quantization(0.5, -10))
        val values = Scores.dequantize(byteArrayOf(-10, 0, 127), out)
        assertEquals(listOf(0f, 5f, 68.5f), values.toList())
    }

    @Test
    fun bundleCheckCatchesAWrongSha256() {
        val dir = Files.createTempDirectory("bundle").toFile()
        val payload = ByteArray(1000) { it.toByte() }
        File(dir, "model.tflite").writeBytes(payload)
        val good = manifest.artefact("model_fp32.tflite").copy(
            file = "model.tflite", bytes = 1000, sha256 = BundleCheck.sha256(payload.inputStream()))
        BundleCheck.verify(dir, manifest, good)  // passes
        payload[500] = 0x7f
        File(dir, "model.tflite").writeBytes(payload)
        val message = expectBundleError { BundleCheck.verify(dir, manifest, good) }
        assertTrue(message, message.contains("model.tflite: sha256 differs from the manifest"))
        File(dir, "model.tflite").delete()
        assertTrue(expectBundleError { BundleCheck.verify(dir, manifest, good) }.contains("missing"))
    }

    @Test
    fun bundleCheckCatchesAClassCountThatDoesNotMatchTheModel() {
        val artefact = manifest.artefact("model_fp32.tflite")
        assertTrue(BundleCheck.outputSizeProblems(artefact, 6, manifest).isEmpty())
        val problems = BundleCheck.outputSizeProblems(artefact, 7, manifest)
        assertEquals(1, problems.size)
        assertTrue(problems[0], problems[0].contains("the model gives 7 scores but the manifest lists 6 classes"))
        val fewer = artefact.copy(outputs = listOf(artefact.outputs.single().copy(shape = listOf(1, 5))))
        assertTrue(BundleCheck.contractProblems(fewer, manifest).single().contains("gives 5 scores"))
        val nchw = artefact.copy(inputs = listOf(artefact.inputs.single().copy(shape = listOf(1, 3, 224, 224))))
        assertTrue(BundleCheck.contractProblems(nchw, manifest).single().contains("is not [1, 224, 224, 3]"))
    }
}
