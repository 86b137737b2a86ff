package org.trashsort.core

/** One class's score in an answer. */
data class Scored(val classId: Int, val name: String, val probability: Double, val stream: String?)

/** What the app shows for a frame: top-k, and "uncertain" when the best is below the threshold. */
data class Answer(val topK: List<Scored>, val uncertain: Boolean, val latencyMs: Double) {
    val label: String get() = if (uncertain) UNCERTAIN else topK.first().name

    companion object {
        const val UNCERTAIN = "uncertain"
    }
}

/** Model outputs to answers, following the manifest's class list (its only source of names and streams). */
object Scores {
    /** Softmax in double precision (what numpy computes in the pipeline's golden vectors). */
    fun softmax(logits: FloatArray): DoubleArray {
        val max = logits.maxOrNull() ?: return DoubleArray(0)
        val exps = DoubleArray(logits.size) { Math.exp((logits[it] - max).toDouble()) }
        val sum = exps.sum()
        return DoubleArray(exps.size) { exps[it] / sum }
    }

    /** Dequantize an int8/uint8 output tensor (a full-integer model's logits). */
    fun dequantize(raw: ByteArray, output: TensorInfo): FloatArray {
        val q = output.quantization ?: throw IllegalArgumentException("${output.name}: no quantization to undo")
        val signed = output.dtype == "int8"
        return FloatArray(raw.size) {
            val v = if (signed) raw[it].toInt() else raw[it].toInt() and 0xFF
            ((v - q.zeroPoint) * q.scale).toFloat()
        }
    }

    /** The [k] most probable classes, highest first (ties: lower class id first, as numpy's argsort). */
    fun topK(probabilities: DoubleArray, manifest: Manifest, k: Int): List<Scored> {
        require(probabilities.size == manifest.classes.size) {
            "model gives ${probabilities.size} scores, the manifest has ${manifest.classes.size} classes"
        }
        return probabilities.indices.sortedWith(compareBy({ -probabilities[it] }, { it })).take(maxOf(1, k)).map {
            val c = manifest.classes[it]
            Scored(c.id, c.name, probabilities[it], c.stream)
        }
    }

    fun answer(logits: FloatArray, manifest: Manifest, k: Int = 3, minConfidence: Double = 0.0,
               latencyMs: Double = 0.0): Answer {
        val top = topK(softmax(logits), manifest, k)
        return Answer(top, top.first().probability < minConfidence, latencyMs)
    }
}
