package org.trashsort.core

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

/** A manifest that cannot be used; the message lists every problem found (as the Python loader does). */
class ManifestException(message: String) : Exception(message)

data class ClassInfo(val id: Int, val name: String, val stream: String?)

data class InputSpec(
    val layout: String,
    val dtype: String,
    val normalizedInGraph: Boolean,
    val mean: List<Double>,
    val std: List<Double>,
)

/** How a photo becomes the model input: shorter side to round(max(size) / cropPct), center crop. */
data class Preprocess(
    val height: Int,
    val width: Int,
    val cropPct: Double,
    val interpolation: String,
    val input: InputSpec,
) {
    /** The resize target of the shorter side; Python's round() (half to even), like the pipeline. */
    val resizeShorterTo: Int get() = Math.rint(maxOf(height, width) / cropPct).toInt()
}

data class Quantization(val scale: Double, val zeroPoint: Int)

data class TensorInfo(val name: String, val shape: List<Int>, val dtype: String, val quantization: Quantization?)

/** How a head-changed artefact is rebuilt from the previous bundle's (see [HeadUpdate]). */
data class HeadUpdateInfo(val fromSha256: String, val file: String, val sha256: String, val classes: Int, val features: Int)

data class Artefact(
    val file: String,
    val format: String,
    val precision: String,
    val bytes: Long?,
    val sha256: String,
    val inputs: List<TensorInfo>,
    val outputs: List<TensorInfo>,
    val headUpdate: HeadUpdateInfo? = null,
)

/** The bundle's manifest.json: the one source of classes, preprocessing and artefacts. */
data class Manifest(
    val name: String,
    val version: Int,
    val classes: List<ClassInfo>,
    val preprocess: Preprocess,
    val artefacts: List<Artefact>,
) {
    val classNames: List<String> get() = classes.map { it.name }

    fun artefact(file: String): Artefact =
        artefacts.firstOrNull { it.file == file }
            ?: throw ManifestException("$file: not an artefact of this bundle (it has ${artefacts.map { it.file }})")

    /** The stream (e.g. "paper-recycling") of a class, or null when the manifest gives none. */
    fun streamOf(className: String): String? = classes.firstOrNull { it.name == className }?.stream

    companion object {
        const val SCHEMA = "trashsort.manifest/1"
        private val INTERPOLATIONS = setOf("bilinear", "bicubic", "nearest")

        /** Parse and check a manifest; every problem is reported at once, naming [source]. */
        fun parse(text: String, source: String = "manifest.json"): Manifest {
            val root = try {
                JSONObject(text)
            } catch (e: JSONException) {
                throw ManifestException("$source: not valid JSON (${e.message})")
            }
            val p = Problems()
            val schema = p.string(root, "schema", "")
            if (schema != null && schema != SCHEMA) p.add("schema: expected '$SCHEMA', got '$schema'")
            val name = p.string(root, "name", "")
            val version = p.int(root, "version", "")
            val classes = p.array(root, "classes", "")?.let { parseClasses(it, p) }
            val preprocess = p.obj(root, "preprocess", "")?.let { parsePreprocess(it, p) }
            val artefacts = root.optJSONArray("artefacts")?.let { parseArtefacts(it, p) } ?: emptyList()
            if (p.list.isNotEmpty() || name == null || version == null || classes == null || preprocess == null) {
                throw ManifestException("$source: invalid manifest:\n  - " + p.list.joinToString("\n  - "))
            }
            return Manifest(name, version, classes, preprocess, artefacts)
        }

        private fun parseClasses(array: JSONArray, p: Problems): List<ClassInfo> {
            if (array.length() == 0) p.add("classes: must list at least one class")
            val out = mutableListOf<ClassInfo>()
            for (i in 0 until array.length()) {
                val c = array.optJSONObject(i)
                if (c == null) {
                    p.add("classes[$i]: expected an object")
                    continue
                }
                val where = "classes[$i]."
                val id = p.int(c, "id", where)
                if (id != null && id != i) p.add("${where}id: ids must be 0..N-1 in order, expected $i, got $id")
                val name = p.string(c, "name", where)
                if (name != null && name.isBlank()) p.add("${where}name: must not be empty")
                val stream = if (c.isNull("stream")) null else c.optString("stream")
                if (id != null && name != null) out.add(ClassInfo(id, name, stream))
            }
            val dupes = out.groupBy { it.name }.filter { it.value.size > 1 }.keys
            if (dupes.isNotEmpty()) p.add("classes: duplicate names ${dupes.sorted()}")
            return out
        }

        private fun parsePreprocess(obj: JSONObject, p: Problems): Preprocess? {
            val size = p.array(obj, "size", "preprocess.")
            var height = 0
            var width = 0
            if (size != null) {
                if (size.length() != 2 || (0 until 2).any { size.optInt(it, -1) <= 0 }) {
                    p.add("preprocess.size: expected [height, width] positive integers, got $size")
                } else {
                    height = size.getInt(0)
                    width = size.getInt(1)
                }
            }
            val crop = p.double(obj, "crop_pct", "preprocess.")
            if (crop != null && !(crop > 0 && crop <= 1)) p.add("preprocess.crop_pct: must be in (0, 1], got $crop")
            val interpolation = p.string(obj, "interpolation", "preprocess.")
            if (interpolation != null && interpolation !in INTERPOLATIONS) {
                p.add("preprocess.interpolation: expected one of $INTERPOLATIONS, got '$interpolation'")
            }
            val spec = p.obj(obj, "input", "preprocess.") ?: return null
            val where = "preprocess.input."
            val layout = p.string(spec, "layout", where)
            if (layout != null && layout != "NHWC") p.add("${where}layout: this app feeds NHWC, got '$layout'")
            val dtype = p.string(spec, "dtype", where)
            val normalized = if (spec.has("normalized_in_graph")) spec.optBoolean("normalized_in_graph") else {
                p.add("${where}normalized_in_graph: missing"); true
            }
            val mean = p.numbers(spec, "mean", where)
            val std = p.numbers(spec, "std", where)
            if (std != null && std.any { it <= 0 }) p.add("${where}std: must be positive, got $std")
            if (crop == null || interpolation == null || layout == null || dtype == null || mean == null ||
                std == null || height == 0
            ) return null
            return Preprocess(height, width, crop, interpolation, InputSpec(layout, dtype, normalized, mean, std))
        }

        private fun parseArtefacts(array: JSONArray, p: Problems): List<Artefact> {
            val out = mutableListOf<Artefact>()
            for (i in 0 until array.length()) {
                val a = array.optJSONObject(i) ?: run { p.add("artefacts[$i]: expected an object"); null } ?: continue
                val where = "artefacts[$i]."
                val file = p.string(a, "file", where)
                val format = p.string(a, "format", where)
                val precision = p.string(a, "precision", where)
                val sha = p.string(a, "sha256", where)
                val inputs = parseTensors(a.optJSONArray("inputs"), "${where}inputs", p)
                val outputs = parseTensors(a.optJSONArray("outputs"), "${where}outputs", p)
                val bytes = if (a.has("bytes") && !a.isNull("bytes")) a.optLong("bytes") else null
                val head = a.optJSONObject("head_update")?.let { parseHeadUpdate(it, "${where}head_update.", p) }
                if (file != null && format != null && precision != null && sha != null) {
                    out.add(Artefact(file, format, precision, bytes, sha, inputs, outputs, head))
                }
            }
            return out
        }

        private fun parseHeadUpdate(obj: JSONObject, where: String, p: Problems): HeadUpdateInfo? {
            val from = p.string(obj, "from_sha256", where)
            val file = p.string(obj, "file", where)
            val sha = p.string(obj, "sha256", where)
            val shape = p.array(obj, "shape", where)
            val dims = shape?.let { s -> (0 until s.length()).map { s.optInt(it, -1) } }
            val classesAndFeatures = dims?.takeIf { it.size == 2 && it.all { d -> d > 0 } }
            if (dims != null && classesAndFeatures == null) {
                p.add("${where}shape: expected [classes, features] positive integers, got $shape")
            }
            if (from == null || file == null || sha == null || classesAndFeatures == null) return null
            return HeadUpdateInfo(from, file, sha, classesAndFeatures[0], classesAndFeatures[1])
        }

        private fun parseTensors(array: JSONArray?, where: String, p: Problems): List<TensorInfo> {
            if (array == null) return emptyList()
            val out = mutableListOf<TensorInfo>()
            for (i in 0 until array.length()) {
                val t = array.optJSONObject(i) ?: continue
                val shapeArray = t.optJSONArray("shape")
                val shape = (0 until (shapeArray?.length() ?: 0)).map { shapeArray!!.optInt(it, -1) }
                val q = t.optJSONObject("quantization")
                val quant = q?.let { Quantization(it.optDouble("scale"), it.optInt("zero_point")) }
                val dtype = t.optString("dtype", "")
                if (dtype.isEmpty()) p.add("$where[$i].dtype: missing")
                out.add(TensorInfo(t.optString("name", "$i"), shape, dtype, quant))
            }
            return out
        }
    }

    /** Collects problems while reading, so that all of them are reported together. */
    private class Problems {
        val list = mutableListOf<String>()
        fun add(problem: String) { list.add(problem) }

        fun string(obj: JSONObject, key: String, where: String): String? = when {
            !obj.has(key) -> null.also { add("$where$key: missing") }
            obj.opt(key) !is String -> null.also { add("$where$key: expected a string, got ${obj.opt(key)}") }
            else -> obj.getString(key)
        }

        fun int(obj: JSONObject, key: String, where: String): Int? = when {
            !obj.has(key) -> null.also { add("$where$key: missing") }
            obj.opt(key) !is Int -> null.also { add("$where$key: expected an integer, got ${obj.opt(key)}") }
            else -> obj.getInt(key)
        }

        fun double(obj: JSONObject, key: String, where: String): Double? = when {
            !obj.has(key) -> null.also { add("$where$key: missing") }
            obj.opt(key) !is Number -> null.also { add("$where$key: expected a number, got ${obj.opt(key)}") }
            else -> obj.getDouble(key)
        }

        fun obj(obj: JSONObject, key: String, where: String): JSONObject? = when {
            !obj.has(key) -> null.also { add("$where$key: missing") }
            else -> obj.optJSONObject(key) ?: null.also { add("$where$key: expected an object") }
        }

        fun array(obj: JSONObject, key: String, where: String): JSONArray? = when {
            !obj.has(key) -> null.also { add("$where$key: missing") }
            else -> obj.optJSONArray(key) ?: null.also { add("$where$key: expected a list") }
        }

        fun numbers(obj: JSONObject, key: String, where: String): List<Double>? {
            val array = array(obj, key, where) ?: return null
            val values = (0 until array.length()).map { array.opt(it) }
            if (values.size != 3 || values.any { it !is Number }) {
                add("$where$key: expected 3 numbers, got $array")
                return null
            }
            return values.map { (it as Number).toDouble() }
        }
    }
}
