package org.trashsort.core

import org.junit.Assert.assertEquals
import org.junit.Assert.assertNull
import org.junit.Assert.assertTrue
import org.junit.Assert.fail
import org.junit.Test
import org.json.JSONObject

class ManifestTest {
    private val real: String = javaClass.getResource("/manifest.json")!!.readText()

    @Test
    fun parsesTheRealExportedManifest() {
        val m = Manifest.parse(real)
        assertEquals(listOf("cardboard", "glass", "metal", "paper", "plastic", "trash"), m.classNames)
        assertEquals(224, m.preprocess.height)
        assertEquals(256, m.preprocess.resizeShorterTo)
        assertEquals("bilinear", m.preprocess.interpolation)
        assertTrue(m.preprocess.input.normalizedInGraph)
        val tflite = m.artefact("model_fp32.tflite")
        assertEquals(listOf(1, 224, 224, 3), tflite.inputs.single().shape)
        assertEquals("uint8", tflite.inputs.single().dtype)
        assertEquals(listOf(1, 6), tflite.outputs.single().shape)
        assertEquals(64, tflite.sha256.length)
        assertNull(m.streamOf("glass"))
        assertTrue(BundleCheck.contractProblems(tflite, m).isEmpty())
    }

    @Test
    fun brokenManifestsReportEveryProblem() {
        val doc = JSONObject(real)
        doc.put("schema", "other/9")
        doc.getJSONArray("classes").getJSONObject(2).put("id", 7)
        doc.getJSONObject("preprocess").put("crop_pct", 1.5)
        doc.getJSONObject("preprocess").remove("interpolation")
        val message = expectInvalid(doc.toString())
        assertTrue(message, message.contains("schema: expected 'trashsort.manifest/1', got 'other/9'"))
        assertTrue(message, message.contains("classes[2].id: ids must be 0..N-1 in order, expected 2, got 7"))
        assertTrue(message, message.contains("preprocess.crop_pct: must be in (0, 1], got 1.5"))
        assertTrue(message, message.contains("preprocess.interpolation: missing"))
    }

    @Test
    fun notJsonOrMissingSectionsAreClearErrors() {
        assertTrue(expectInvalid("{not json", "bundle/manifest.json").startsWith("bundle/manifest.json: not valid JSON"))
        val message = expectInvalid("""{"schema": "trashsort.manifest/1", "name": "x", "version": 1}""")
        assertTrue(message, message.contains("classes: missing") && message.contains("preprocess: missing"))
        val dupes = JSONObject(real)
        dupes.getJSONArray("classes").getJSONObject(1).put("name", "cardboard")
        assertTrue(expectInvalid(dupes.toString()).contains("classes: duplicate names [cardboard]"))
    }

    private fun expectInvalid(text: String, source: String = "manifest.json"): String {
        try {
            Manifest.parse(text, source)
        } catch (e: ManifestException) {
            return e.message!!
        }
        fail("expected a ManifestException")
        throw AssertionError()
    }
}
