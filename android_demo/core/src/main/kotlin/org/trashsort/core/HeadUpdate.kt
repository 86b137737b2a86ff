package org.trashsort.core

import java.io.ByteArrayOutputStream
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder

/**
 * A head update: a new class list without downloading the model again. A bundle made by a head change
 * (`trashsort add-class` and friends) can be sent without its fp32 `.tflite`; the device rebuilds that
 * file from the one it has and the bundle's `head_fp32.bin` (weight then bias, little-endian float32).
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
    private const val TENSOR_SHAPE_SIGNATURE = 7
    private const val OPERATOR_OPCODE_INDEX = 0
    private const val OPERATOR_INPUTS = 1
    private const val OPERATOR_OUTPUTS = 2
    private const val OPCODE_DEPRECATED_BUILTIN = 0
    private const val OPCODE_BUILTIN = 3
    private const val BUFFER_DATA = 0
    private const val BUFFER_OFFSET = 1
    private const val FULLY_CONNECTED = 9
    private const val FLOAT32 = 0

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
        val values = ByteBuffer.wrap(head).order(ByteOrder.LITTLE_ENDIAN).asFloatBuffer()
        if (values.remaining() != update.classes * (update.features + 1)) {
            throw BundleException("$headFile: ${values.remaining()} values, the manifest's head shape " +
                "[${update.classes}, ${update.features}] needs ${update.classes * (update.features + 1)}")
        }
        val weight = FloatArray(update.classes * update.features).also { values.get(it) }
        val bias = FloatArray(update.classes).also { values.get(it) }
        val rebuilt = withNewHead(previous, weight, bias)
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
     * The `.tflite` with the weight (classes x features, row-major) and bias of its last op, a
     * fully-connected classifier, replaced (any number of classes); null when the graph does not end
     * in one that fits.
     */
    fun withNewHead(flatbuffer: ByteArray, weight: FloatArray, bias: FloatArray): ByteArray? {
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
        val classes = bias.size
        val oldShape = fb.ints(weightTensor, TENSOR_SHAPE)
        if (oldShape.size != 2 || weight.size != classes * oldShape[1]) return null
        val features = oldShape[1]
        val buffers = fb.tables(fb.root, MODEL_BUFFERS)
        val headBuffers = setOf(fb.int(weightTensor, TENSOR_BUFFER), fb.int(biasTensor, TENSOR_BUFFER))
        val fits = fb.byte(weightTensor, TENSOR_TYPE) == FLOAT32 && fb.byte(biasTensor, TENSOR_TYPE) == FLOAT32 &&
            fb.ints(tensors[output], TENSOR_SHAPE) == listOf(1, oldShape[0]) &&
            tensors.count { fb.int(it, TENSOR_BUFFER) in headBuffers } == 2 &&  // not shared with other tensors
            headBuffers.all { fb.field(buffers[it], BUFFER_DATA) != null && fb.long(buffers[it], BUFFER_OFFSET) == 0L }
        if (!fits) return null

        val out = flatbuffer.copyOf()
        val tail = ByteArrayOutputStream()
        fun appendAndPoint(field: Int, count: Int, payload: ByteArray) {
            while ((flatbuffer.size + tail.size() + 4) % 16 != 0) tail.write(0)  // the data 16-byte aligned
            ByteBuffer.wrap(out).order(ByteOrder.LITTLE_ENDIAN).putInt(field, flatbuffer.size + tail.size() - field)
            tail.write(littleEndian(4 + payload.size) { it.putInt(count).put(payload) })
        }
        fun int32s(shape: List<Int>) = littleEndian(4 * shape.size) { b -> shape.forEach { b.putInt(it) } }
        fun float32s(values: FloatArray) = littleEndian(4 * values.size) { b -> values.forEach { b.putFloat(it) } }

        val head = listOf(weightTensor to float32s(weight), biasTensor to float32s(bias))
        for ((tensor, data) in head) {
            appendAndPoint(fb.field(buffers[fb.int(tensor, TENSOR_BUFFER)], BUFFER_DATA)!!, data.size, data)
        }
        val shapes = listOf(weightTensor to listOf(classes, features), biasTensor to listOf(classes),
            tensors[output] to listOf(1, classes))
        for ((tensor, shape) in shapes) {
            for (index in listOf(TENSOR_SHAPE, TENSOR_SHAPE_SIGNATURE)) {
                fb.field(tensor, index)?.let { appendAndPoint(it, shape.size, int32s(shape)) }
            }
        }
        return out + tail.toByteArray()
    }

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

        private fun vector(table: Int, index: Int): Int? = field(table, index)?.let { it + b.getInt(it) }

        fun tables(table: Int, index: Int): List<Int> {
            val vector = vector(table, index) ?: return emptyList()
            return List(b.getInt(vector)) { k -> (vector + 4 + 4 * k).let { slot -> slot + b.getInt(slot) } }
        }

        fun ints(table: Int, index: Int): List<Int> {
            val vector = vector(table, index) ?: return emptyList()
            return List(b.getInt(vector)) { k -> b.getInt(vector + 4 + 4 * k) }
        }
    }
}
