package org.trashsort.core

import org.json.JSONArray
import org.json.JSONObject
import org.junit.Assert.assertArrayEquals
import org.junit.Assert.assertEquals
import org.junit.Assert.assertFalse
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Test
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.nio.file.Files

/** A head update rebuilt on the device gives the file the pipeline wrote (edge/head.py), byte for byte;
 * a wrong model, a damaged head file or a head that does not fit is refused and nothing is written. */
class HeadUpdateTest {
    private val golden = File(System.getProperty("trashsort.golden") ?: "build/golden")
    private val dir = File(golden, "head_update")
    private val index = JSONObject(File(golden, "index.json").readText()).getJSONObject("head_update")
    private val previous = File(dir, "previous.tflite").readBytes()
    private val shape = index.getJSONArray("shape").let { listOf(it.getInt(0), it.getInt(1)) }
    private val artefact = headUpdated("fp32", "rebuilt.tflite", "previous.tflite", "head_fp32.bin")
    private val int8Artefact = headUpdated("int8", "rebuilt_int8.tflite", "previous_int8.tflite", "head_int8.bin")

    /** The manifest entry of a head-updated .tflite whose golden files are [rebuilt], [previous] and [head]. */
    private fun headUpdated(precision: String, rebuilt: String, previous: String, head: String) = Artefact(
        "model_$precision.tflite", "tflite", precision, null, index.getString(rebuilt), emptyList(), emptyList(),
        HeadUpdateInfo(index.getString(previous), head, index.getString(head), shape[0], shape[1]))

    @Test
    fun rebuildsThePipelinesFileByteForByte() {
        val bundle = update()
        val written = HeadUpdate.rebuild(bundle, artefact, previous)
        assertArrayEquals(File(dir, "rebuilt.tflite").readBytes(), written.readBytes())
        assertEquals(listOf("head_fp32.bin", "model_fp32.tflite"), bundle.list()!!.sorted())
    }

    @Test
    fun aSecondUpdateOnTheRebuiltFileAndAHeadThatDoesNotFit() {
        val (weight, bias) = head(File(dir, "head_fp32.bin").readBytes())
        val rebuilt = File(dir, "rebuilt.tflite").readBytes()
        assertArrayEquals(rebuilt, HeadUpdate.withNewHead(previous, weight, bias))
        // a second update, on the rebuilt file (three of the classes): its fields are re-pointed again
        assertArrayEquals(File(dir, "rebuilt_again.tflite").readBytes(),
            HeadUpdate.withNewHead(rebuilt, weight.copyOf(3 * shape[1]), bias.copyOf(3)))
        assertNull(HeadUpdate.withNewHead(previous, FloatArray(5 * (shape[1] + 1)), FloatArray(5)))  // wrong width
        assertNull(HeadUpdate.withNewHead(ByteArray(64), weight, bias))  // not a classifier's graph
    }

    @Test
    fun rebuildsThePipelinesInt8FileByteForByte() {
        val bundle = update("head_int8.bin")
        val written = HeadUpdate.rebuild(bundle, int8Artefact, File(dir, "previous_int8.tflite").readBytes())
        assertArrayEquals(File(dir, "rebuilt_int8.tflite").readBytes(), written.readBytes())
        // a second update on the rebuilt file (three of the classes), as edge/head.py made it
        val bytes = ByteBuffer.wrap(File(dir, "head_int8.bin").readBytes()).order(ByteOrder.LITTLE_ENDIAN)
        val (classes, features) = shape
        val bias = IntArray(classes) { bytes.int }
        val weightScale = FloatArray(classes) { bytes.float }
        val biasScale = FloatArray(classes) { bytes.float }
        val three = HeadUpdate.Quantization(weightScale.copyOf(3), biasScale.copyOf(3), bytes.float, bytes.int)
        val weight = ByteArray(classes * features).also { bytes.get(it) }
        assertArrayEquals(File(dir, "rebuilt_again_int8.tflite").readBytes(),
            HeadUpdate.withNewInt8Head(written.readBytes(), weight.copyOf(3 * features), bias.copyOf(3), three))
        // an fp32 head does not fit an INT8 file, nor the other way round
        assertNull(HeadUpdate.withNewHead(written.readBytes(), FloatArray(classes * features), FloatArray(classes)))
        assertNull(HeadUpdate.withNewInt8Head(previous, weight, bias, HeadUpdate.Quantization(weightScale, biasScale, 1f, 0)))
        // a head file of the wrong size (its hash in the manifest, so the size check speaks)
        val short = update("head_int8.bin").also { File(it, "head_int8.bin").writeBytes(File(dir, "head_int8.bin").readBytes().copyOf(100)) }
        val shortEntry = int8Artefact.copy(headUpdate = int8Artefact.headUpdate!!.copy(
            sha256 = BundleCheck.sha256(File(short, "head_int8.bin").inputStream())))
        val message = expectBundleError { HeadUpdate.rebuild(short, shortEntry, File(dir, "previous_int8.tflite").readBytes()) }
        assertTrue(message, message.contains("100 bytes, a int8 head"))
        assertFalse(File(short, "model_int8.tflite").exists())
    }

    @Test
    fun refusesAnotherModelOrADamagedHeadAndWritesNothing() {
        val other = previous.copyOf().also { it[previous.size - 1] = (it[previous.size - 1] + 1).toByte() }
        val bundle = update()
        assertTrue(expectBundleError { HeadUpdate.rebuild(bundle, artefact, other) }.contains("not the one this head update"))
        val head = File(bundle, "head_fp32.bin")
        head.writeBytes(head.readBytes().copyOf(head.length().toInt() - 4) + ByteArray(4))
        assertTrue(expectBundleError { HeadUpdate.rebuild(bundle, artefact, previous) }.contains("sha256 differs"))
        val wrongHash = artefact.copy(sha256 = "0".repeat(64))
        assertTrue(expectBundleError { HeadUpdate.rebuild(update(), wrongHash, previous) }.contains("does not match"))
        assertFalse(File(bundle, "model_fp32.tflite").exists())
        assertEquals(listOf("head_fp32.bin"), bundle.list()!!.toList())
    }

    @Test
    fun theManifestDescribesTheHeadUpdate() {
        val entry = JSONObject(javaClass.getResource("/manifest.json")!!.readText())
        val tflite = entry.getJSONArray("artefacts").getJSONObject(2)
        tflite.put("head_update", JSONObject(mapOf("from_sha256" to "ab".repeat(32), "file" to "head_fp32.bin",
            "sha256" to "cd".repeat(32), "shape" to JSONArray(listOf(6, 1024)))))
        val parsed = Manifest.parse(entry.toString()).artefact(tflite.getString("file")).headUpdate!!
        assertEquals(HeadUpdateInfo("ab".repeat(32), "head_fp32.bin", "cd".repeat(32), 6, 1024), parsed)
        tflite.getJSONObject("head_update").put("shape", JSONArray(listOf(6)))
        val message = try {
            Manifest.parse(entry.toString()); ""
        } catch (e: ManifestException) {
            e.message!!
        }
        assertTrue(message, message.contains("head_update.shape: expected [classes, features]"))
    }

    /** A bundle folder as a device receives it: the head file, no .tflite. */
    private fun update(headFile: String = "head_fp32.bin"): File = Files.createTempDirectory("update").toFile().also {
        File(dir, headFile).copyTo(File(it, headFile))
    }

    private fun head(bytes: ByteArray): Pair<FloatArray, FloatArray> {
        val values = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
        return FloatArray(shape[0] * shape[1]).also { values.get(it) } to FloatArray(shape[0]).also { values.get(it) }
    }
}
