package org.trashsort.core

import java.io.ByteArrayOutputStream
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * A head update: a new class list without downloading the model again. A bundle made by a head change
 * (`trashsort add-class` and friends) can be sent without its `.tflite` files; the device rebuilds each
 * from the one it has and the bundle's head file: `head_fp32.bin` (weight then bias, little-endian
 * float32) or `head_int8.bin` (int32 bias, float32 weight scales, bias scales and logits scale, int32
 * logits zero point, then the int8 weight; see edge/head.py: head_bytes).
 *
 * The rebuild takes the same steps as the pipeline's `edge/head.py: with_new_head`, so the file is the
 * pipeline's byte for byte and its sha256 is checked against the manifest: the new weight, bias and
 * shapes are appended (each vector's data 16-byte aligned) and the fields that pointed at the old ones
 * are re-pointed; a flatbuffer offset may point anywhere after itself, so nothing else moves.
 */
object HeadUpdate {
    // The few fields of LiteRT's schema (schema.fbs) read here: table field indices and enum values.
    private const val MODEL_OPERATOR_CODES = 1
    private const val MODEL_SUBGRAPHS = 2
    private const val MODEL_BUFFERS = 4
    private const val SUBGRAPH_TENSORS = 0
    private const val SUBGRAPH_OUTPUTS = 2
    private const val SUBGRAPH_OPERATORS = 3
    private const val TENSOR_SHAPE = 0
    private const val TENSOR_TYPE = 1
    private const val TENSOR_BUFFER = 2
    private const val TENSOR_QUANTIZATION = 4
    private const val TENSOR_SHAPE_SIGNATURE = 7
    private const val QUANTIZATION_SCALE = 2
    private const val QUANTIZATION_ZERO_POINT = 3
    private const val OPERATOR_OPCODE_INDEX = 0
    private const val OPERATOR_INPUTS = 1
    private const val OPERATOR_OUTPUTS = 2
    private const val OPCODE_DEPRECATED_BUILTIN = 0
    private const val OPCODE_BUILTIN = 3
    private const val BUFFER_DATA = 0
    private const val BUFFER_OFFSET = 1
    private const val FULLY_CONNECTED = 9
    private const val FLOAT32 = 0
    private const val INT32 = 2
    private const val INT8 = 9

    /** An INT8 classifier's quantization: per-class weight and bias scales, the int8 logits' scale and zero point. */
    class Quantization(val weightScale: FloatArray, val biasScale: FloatArray, val outputScale: Float, val outputZeroPoint: Int)

    /**
     * Rebuild [artefact] of a head-update bundle into [bundle] from [previous], the bytes of the file
     * the device already has. Checks the previous file's and the head file's sha256 before, and the
     * result's after; writes through a temporary file, so a failure leaves nothing behind.
     */
    fun rebuild(bundle: File, artefact: Artefact, previous: ByteArray): File {
        val update = artefact.headUpdate ?: throw BundleException("${artefact.file}: not a head update")
        if (sha256(previous) != update.fromSha256) {
            throw BundleException("${artefact.file}: the model on this device is not the one this head update " +
                "was made from (sha256 ${update.fromSha256.take(16)}...); copy the full ${artefact.file} instead")
        }
        val headFile = File(bundle, update.file)
        val head = if (headFile.isFile) headFile.readBytes() else null
        if (head == null || sha256(head) != update.sha256) {
            throw BundleException("$headFile: missing or its sha256 differs from the manifest")
        }
        val (classes, features) = update.classes to update.features
        val needed = if (artefact.precision == "int8") 12 * classes + 8 + classes * features else 4 * classes * (features + 1)
        if (head.size != needed) {
            throw BundleException("$headFile: ${head.size} bytes, a ${artefact.precision} head of the manifest's " +
                "shape [$classes, $features] takes $needed")
        }
        val values = ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN)
        val rebuilt = when (artefact.precision) {
            "fp32" -> withNewHead(previous, FloatArray(classes * features) { values.float }, FloatArray(classes) { values.float })
            "int8" -> {
                val bias = IntArray(classes) { values.int }
                val quantization = Quantization(FloatArray(classes) { values.float }, FloatArray(classes) { values.float },
                    values.float, values.int)
                withNewInt8Head(previous, ByteArray(classes * features).also { values.get(it) }, bias, quantization)
            }
            else -> throw BundleException("${artefact.file}: no head update for precision ${artefact.precision}")
        }
        if (rebuilt == null || sha256(rebuilt) != artefact.sha256) {
            throw BundleException("${artefact.file}: the rebuilt model does not match the manifest's sha256; " +
                "copy the full ${artefact.file} instead")
        }
        val target = File(bundle, artefact.file)
        val temporary = File(bundle, ".${artefact.file}.partial")
        temporary.writeBytes(rebuilt)
        if (!temporary.renameTo(target)) {
            temporary.delete()
            throw BundleException("$target: could not be written")
        }
        return target
    }

    /**
     * The fp32 `.tflite` with the weight (classes x features, row-major) and bias of its last op, a
     * fully-connected classifier, replaced (any number of classes); null when the graph does not end
     * in one that fits.
     */
    fun withNewHead(flatbuffer: ByteArray, weight: FloatArray, bias: FloatArray): ByteArray? =
        replaceHead(flatbuffer, bias.size, float32s(weight), float32s(bias), null)

    /** The same for an INT8 `.tflite`: int8 weight, int32 bias and their [quantization]. */
    fun withNewInt8Head(flatbuffer: ByteArray, weight: ByteArray, bias: IntArray, quantization: Quantization): ByteArray? {
        if (quantization.weightScale.size != bias.size || quantization.biasScale.size != bias.size) return null
        return replaceHead(flatbuffer, bias.size, weight, littleEndian(4 * bias.size) { b -> bias.forEach { b.putInt(it) } },
            quantization)
    }

    /** Both precisions, the steps of edge/head.py: with_new_head in the same order. */
    private fun replaceHead(flatbuffer: ByteArray, classes: Int, weightData: ByteArray, biasData: ByteArray,
                            quantization: Quantization?): ByteArray? {
        val fb = Flatbuffer(flatbuffer)
        val graph = fb.tables(fb.root, MODEL_SUBGRAPHS).singleOrNull() ?: return null
        val output = fb.ints(graph, SUBGRAPH_OUTPUTS).singleOrNull() ?: return null
        val tensors = fb.tables(graph, SUBGRAPH_TENSORS)
        val op = fb.tables(graph, SUBGRAPH_OPERATORS).filter { output in fb.ints(it, OPERATOR_OUTPUTS) }
            .singleOrNull() ?: return null
        val inputs = fb.ints(op, OPERATOR_INPUTS)
        if (inputs.size != 3 || inputs[2] < 0) return null  // no bias (a converter drops an all-zero one)
        val code = fb.tables(fb.root, MODEL_OPERATOR_CODES)[fb.int(op, OPERATOR_OPCODE_INDEX)]
        if (maxOf(fb.byte(code, OPCODE_DEPRECATED_BUILTIN), fb.int(code, OPCODE_BUILTIN)) != FULLY_CONNECTED) return null
        val weightTensor = tensors[inputs[1]]
        val biasTensor = tensors[inputs[2]]
        val outputTensor = tensors[output]
        val oldShape = fb.ints(weightTensor, TENSOR_SHAPE)
        if (oldShape.size != 2) return null
        val features = oldShape[1]
        val elementBytes = if (quantization == null) 4 else 1
        if (weightData.size != classes * features * elementBytes) return null
        val buffers = fb.tables(fb.root, MODEL_BUFFERS)
        val headBuffers = setOf(fb.int(weightTensor, TENSOR_BUFFER), fb.int(biasTensor, TENSOR_BUFFER))
        val types = listOf(weightTensor, biasTensor, outputTensor).map { fb.byte(it, TENSOR_TYPE) }
        val fits = types == (if (quantization == null) listOf(FLOAT32, FLOAT32, FLOAT32) else listOf(INT8, INT32, INT8)) &&
            fb.ints(biasTensor, TENSOR_SHAPE) == listOf(oldShape[0]) &&
            fb.ints(outputTensor, TENSOR_SHAPE) == listOf(1, oldShape[0]) &&
            tensors.count { fb.int(it, TENSOR_BUFFER) in headBuffers } == 2 &&  // not shared with other tensors
            headBuffers.all { fb.field(buffers[it], BUFFER_DATA) != null && fb.long(buffers[it], BUFFER_OFFSET) == 0L } &&
            (quantization == null || listOf(weightTensor, biasTensor, outputTensor).all { quantizationFields(fb, it) != null })
        if (!fits) return null

        val out = flatbuffer.copyOf()
        val tail = ByteArrayOutputStream()
        fun appendAndPoint(field: Int, count: Int, payload: ByteArray) {
            while ((flatbuffer.size + tail.size() + 4) % 16 != 0) tail.write(0)  // the data 16-byte aligned
            ByteBuffer.wrap(out).order(ByteOrder.LITTLE_ENDIAN).putInt(field, flatbuffer.size + tail.size() - field)
            tail.write(littleEndian(4 + payload.size) { it.putInt(count).put(payload) })
        }
        fun int32s(shape: List<Int>) = littleEndian(4 * shape.size) { b -> shape.forEach { b.putInt(it) } }
        fun int64s(values: List<Long>) = littleEndian(8 * values.size) { b -> values.forEach { b.putLong(it) } }

        for ((tensor, data) in listOf(weightTensor to weightData, biasTensor to biasData)) {
            appendAndPoint(fb.field(buffers[fb.int(tensor, TENSOR_BUFFER)], BUFFER_DATA)!!, data.size, data)
        }
        val shapes = listOf(weightTensor to listOf(classes, features), biasTensor to listOf(classes),
            outputTensor to listOf(1, classes))
        for ((tensor, shape) in shapes) {
            for (index in listOf(TENSOR_SHAPE, TENSOR_SHAPE_SIGNATURE)) {
                fb.field(tensor, index)?.let { appendAndPoint(it, shape.size, int32s(shape)) }
            }
        }
        if (quantization != null) {
            val zeros = List(classes) { 0L }
            val vectors = listOf(
                Triple(weightTensor, quantization.weightScale, zeros),
                Triple(biasTensor, quantization.biasScale, zeros),
                Triple(outputTensor, floatArrayOf(quantization.outputScale), listOf(quantization.outputZeroPoint.toLong())))
            for ((tensor, scale, zeroPoint) in vectors) {
                val (scaleField, zeroPointField) = quantizationFields(fb, tensor)!!
                appendAndPoint(scaleField, scale.size, float32s(scale))
                appendAndPoint(zeroPointField, zeroPoint.size, int64s(zeroPoint))
            }
        }
        return out + tail.toByteArray()
    }

    /** Where a tensor's quantization keeps its scale and zero-point vectors (null if it has none). */
    private fun quantizationFields(fb: Flatbuffer, tensor: Int): Pair<Int, Int>? {
        val params = fb.table(tensor, TENSOR_QUANTIZATION) ?: return null
        val scale = fb.field(params, QUANTIZATION_SCALE) ?: return null
        val zeroPoint = fb.field(params, QUANTIZATION_ZERO_POINT) ?: return null
        return scale to zeroPoint
    }

    private fun float32s(values: FloatArray) = littleEndian(4 * values.size) { b -> values.forEach { b.putFloat(it) } }

    private fun sha256(bytes: ByteArray): String = BundleCheck.sha256(bytes.inputStream())

    private fun littleEndian(size: Int, fill: (ByteBuffer) -> Unit): ByteArray =
        ByteBuffer.allocate(size).order(ByteOrder.LITTLE_ENDIAN).also(fill).array()

    /** Read-only navigation of a flatbuffer: tables, their fields, vectors (little-endian). */
    private class Flatbuffer(bytes: ByteArray) {
        private val b: ByteBuffer = ByteBuffer.wrap(bytes).order(ByteOrder.LITTLE_ENDIAN)
        val root: Int = b.getInt(0)

        /** Where field [index] of the table at [table] is stored; null when absent. */
        fun field(table: Int, index: Int): Int? {
            val vtable = table - b.getInt(table)
            val vtableSize = b.getShort(vtable).toInt() and 0xFFFF
            if (4 + 2 * index >= vtableSize) return null
            val offset = b.getShort(vtable + 4 + 2 * index).toInt() and 0xFFFF
            return if (offset == 0) null else table + offset
        }

        // Absent scalars read as 0, the schema's default for every field read here.
        fun byte(table: Int, index: Int): Int = field(table, index)?.let { b.get(it).toInt() } ?: 0
        fun int(table: Int, index: Int): Int = field(table, index)?.let { b.getInt(it) } ?: 0
        fun long(table: Int, index: Int): Long = field(table, index)?.let { b.getLong(it) } ?: 0L

        /** A sub-table (or a vector: its length, then its items) that field [index] points to. */
        fun table(table: Int, index: Int): Int? = field(table, index)?.let { it + b.getInt(it) }

        fun tables(table: Int, index: Int): List<Int> {
            val vector = table(table, index) ?: return emptyList()
            return List(b.getInt(vector)) { k -> (vector + 4 + 4 * k).let { slot -> slot + b.getInt(slot) } }
        }

        fun ints(table: Int, index: Int): List<Int> {
            val vector = table(table, index) ?: return emptyList()
            return List(b.getInt(vector)) { k -> b.getInt(vector + 4 + 4 * k) }
        }
    }
}
