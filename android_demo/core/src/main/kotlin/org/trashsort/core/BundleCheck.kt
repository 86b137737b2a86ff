package org.trashsort.core

import java.io.File
import java.io.InputStream
import java.security.MessageDigest

/** A bundle whose files do not match its manifest; the message names each problem. */
class BundleException(message: String) : Exception(message)

/** The checks the app runs before loading a model: the bytes, the input contract, the class count. */
object BundleCheck {
    fun sha256(input: InputStream): String {
        val digest = MessageDigest.getInstance("SHA-256")
        val buffer = ByteArray(1 shl 16)
        while (true) {
            val n = input.read(buffer)
            if (n < 0) break
            digest.update(buffer, 0, n)
        }
        return digest.digest().joinToString("") { "%02x".format(it) }
    }

    /** Problems with one artefact's bytes against the manifest (missing, size, sha256). */
    fun fileProblems(artefact: Artefact, size: Long?, open: () -> InputStream?): List<String> {
        val stream = open() ?: return listOf("${artefact.file}: missing from the bundle")
        stream.use {
            if (size != null && artefact.bytes != null && size != artefact.bytes) {
                return listOf("${artefact.file}: $size bytes, manifest says ${artefact.bytes}")
            }
            if (sha256(it) != artefact.sha256) {
                return listOf("${artefact.file}: sha256 differs from the manifest (damaged or replaced)")
            }
        }
        return emptyList()
    }

    /** Problems with the declared tensors: one RGB NHWC input of the manifest's size in a dtype this app
     * can feed, one output with one score per class. */
    fun contractProblems(artefact: Artefact, manifest: Manifest): List<String> {
        val pre = manifest.preprocess
        val problems = mutableListOf<String>()
        val input = artefact.inputs.singleOrNull()
        val output = artefact.outputs.singleOrNull()
        if (input == null || output == null) {
            return listOf("${artefact.file}: ${artefact.inputs.size} inputs and ${artefact.outputs.size} outputs, " +
                "the contract has one of each")
        }
        if (input.shape != listOf(1, pre.height, pre.width, 3)) {
            problems.add("${artefact.file}: input shape ${input.shape} is not [1, ${pre.height}, ${pre.width}, 3]")
        }
        if (input.dtype !in setOf("uint8", "int8", "float32")) {
            problems.add("${artefact.file}: input dtype ${input.dtype} is not uint8, int8 or float32")
        }
        problems += outputSizeProblems(artefact, output.shape.lastOrNull() ?: -1, manifest)
        return problems
    }

    /** The model's real output size (from the interpreter) against the manifest's classes. */
    fun outputSizeProblems(artefact: Artefact, outputSize: Int, manifest: Manifest): List<String> =
        if (outputSize == manifest.classes.size) emptyList()
        else listOf("${artefact.file}: the model gives $outputSize scores but the manifest lists " +
            "${manifest.classes.size} classes (${manifest.classNames})")

    /** Every check on a bundle folder for one artefact; throws BundleException listing all problems. */
    fun verify(bundle: File, manifest: Manifest, artefact: Artefact) {
        val file = File(bundle, artefact.file)
        val problems = fileProblems(artefact, if (file.isFile) file.length() else null) {
            if (file.isFile) file.inputStream() else null
        } + contractProblems(artefact, manifest)
        if (problems.isNotEmpty()) throw BundleException(problems.joinToString("; "))
    }
}
