package org.trashsort.demo

import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import org.pytorch.executorch.EValue
import org.pytorch.executorch.Module
import org.pytorch.executorch.Tensor
import org.tensorflow.lite.Interpreter
import org.trashsort.core.Artefact
import org.trashsort.core.InputTensor
import org.trashsort.core.Scores

/** One loaded artefact: preprocessed input in, float logits out. Loaded once, used off the main thread. */
interface ModelBackend : AutoCloseable {
    val artefact: Artefact
    /** The number of scores the loaded model really gives (checked against the manifest's classes). */
    val outputSize: Int
    fun run(input: InputTensor): FloatArray
}

/** LiteRT (`com.google.ai.edge.litert:litert`, API package org.tensorflow.lite). */
class LiteRtBackend(override val artefact: Artefact, model: ByteBuffer, threads: Int) : ModelBackend {
    private val interpreter = Interpreter(model, Interpreter.Options().setNumThreads(threads))
    private val output = artefact.outputs.single()
    override val outputSize: Int = interpreter.getOutputTensor(0).shape().last()

    override fun run(input: InputTensor): FloatArray {
        val inBuffer = when (input) {
            is InputTensor.Bytes -> ByteBuffer.allocateDirect(input.data.size).put(input.data)
            is InputTensor.Floats -> ByteBuffer.allocateDirect(input.data.size * 4).order(ByteOrder.nativeOrder())
                .also { it.asFloatBuffer().put(input.data) }
        }.apply { rewind() }
        val bytesPerScore = if (output.dtype == "float32") 4 else 1
        val outBuffer = ByteBuffer.allocateDirect(outputSize * bytesPerScore).order(ByteOrder.nativeOrder())
        interpreter.run(inBuffer, outBuffer)
        outBuffer.rewind()
        return if (bytesPerScore == 4) FloatArray(outputSize).also { outBuffer.asFloatBuffer().get(it) }
        else Scores.dequantize(ByteArray(outputSize).also { outBuffer.get(it) }, output)
    }

    override fun close() = interpreter.close()
}

/** ExecuTorch (`org.pytorch:executorch-android`, XNNPACK delegate); it loads from a file path. */
class ExecuTorchBackend(override val artefact: Artefact, file: File) : ModelBackend {
    private val module = Module.load(file.absolutePath)
    private val shape = artefact.inputs.single().shape.map { it.toLong() }.toLongArray()
    override val outputSize: Int = artefact.outputs.single().shape.last()

    override fun run(input: InputTensor): FloatArray {
        val tensor = when (input) {
            is InputTensor.Bytes -> if (input.dtype == "uint8") Tensor.fromBlobUnsigned(input.data, shape)
            else Tensor.fromBlob(input.data, shape)
            is InputTensor.Floats -> Tensor.fromBlob(input.data, shape)
        }
        return module.forward(EValue.from(tensor))[0].toTensor().dataAsFloatArray
    }

    override fun close() = module.destroy()
}
