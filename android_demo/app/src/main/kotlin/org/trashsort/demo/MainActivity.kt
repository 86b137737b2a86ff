package org.trashsort.demo

import android.Manifest.permission.CAMERA
import android.content.pm.PackageManager
import android.graphics.Bitmap
import android.os.Bundle
import android.os.SystemClock
import android.view.View
import android.widget.AdapterView
import android.widget.ArrayAdapter
import android.widget.Spinner
import android.widget.TextView
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.camera.core.CameraSelector
import androidx.camera.core.ImageAnalysis
import androidx.camera.core.ImageProxy
import androidx.camera.core.Preview
import androidx.camera.lifecycle.ProcessCameraProvider
import androidx.camera.view.PreviewView
import androidx.core.content.ContextCompat
import java.io.File
import java.nio.ByteBuffer
import java.nio.ByteOrder
import java.util.concurrent.ExecutorService
import java.util.concurrent.Executors
import org.trashsort.core.Answer
import org.trashsort.core.Artefact
import org.trashsort.core.BundleCheck
import org.trashsort.core.BundleException
import org.trashsort.core.HeadUpdate
import org.trashsort.core.Manifest
import org.trashsort.core.ManifestException
import org.trashsort.core.Preprocessor
import org.trashsort.core.Scores

/**
 * Camera frames -> the bundle's model -> top-3 with confidence and recycling stream.
 * The bundle (manifest.json + .tflite/.pte) comes from assets/bundle/ (./gradlew :app:copyBundle);
 * everything about classes and preprocessing is read from its manifest, so a bundle with an added
 * class needs no code change, and a head update (a new class list, a few KB) needs no new model either.
 * A missing or invalid bundle shows an error, never a crash.
 */
class MainActivity : AppCompatActivity() {
    private lateinit var result: TextView
    private lateinit var error: TextView
    private val analysis: ExecutorService = Executors.newSingleThreadExecutor()
    private var manifest: Manifest? = null
    private var updateDir: File? = null  // a head update in use instead of assets/bundle/
    @Volatile private var backend: ModelBackend? = null

    private val askCamera = registerForActivityResult(ActivityResultContracts.RequestPermission()) { granted ->
        if (granted) startCamera() else showError(getString(R.string.camera_denied))
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        setContentView(R.layout.activity_main)
        result = findViewById(R.id.result)
        error = findViewById(R.id.error)
        val loaded = try {
            openBundle()
        } catch (e: java.io.IOException) {
            return showError("No bundle in the app: run `make export-mobile`, then " +
                "`./gradlew :app:copyBundle -Pbundle=../dist/<name>-v<version>` and rebuild.")
        } catch (e: ManifestException) {
            return showError(e.message ?: "invalid manifest")
        } catch (e: BundleException) {
            return showError("Head update: ${e.message}")
        }
        manifest = loaded
        val choices = loaded.artefacts.filter { it.format == "tflite" || it.format == "executorch" }
        if (choices.isEmpty()) return showError("The bundle has no .tflite or .pte artefact.")
        val picker = findViewById<Spinner>(R.id.backend)
        picker.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item,
            choices.map { "${it.file} (${it.format} ${it.precision})" })
        picker.onItemSelectedListener = object : AdapterView.OnItemSelectedListener {
            override fun onItemSelected(parent: AdapterView<*>?, view: View?, position: Int, id: Long) {
                analysis.execute { load(loaded, choices[position]) }
            }
            override fun onNothingSelected(parent: AdapterView<*>?) = Unit
        }
        if (ContextCompat.checkSelfPermission(this, CAMERA) == PackageManager.PERMISSION_GRANTED) startCamera()
        else askCamera.launch(CAMERA)
    }

    /**
     * The bundle's manifest: the app's own (assets/bundle/), or a head update pushed next to it
     * (`adb push <new bundle without its .tflite>/. /sdcard/Android/data/org.trashsort.demo/files/update/`),
     * whose missing `.tflite` is rebuilt from the app's own file (HeadUpdate checks every hash) and
     * which is then used instead.
     */
    private fun openBundle(): Manifest {
        val update = getExternalFilesDir(null)?.let { File(it, "update") }
        if (update == null || !File(update, "manifest.json").isFile) {
            return Manifest.parse(assets.open("bundle/manifest.json").bufferedReader().readText(),
                "assets/bundle/manifest.json")
        }
        val manifest = Manifest.parse(File(update, "manifest.json").readText(), "$update/manifest.json")
        for (artefact in manifest.artefacts) {  // once: later starts find the rebuilt file (~0.1 s for 6 MB)
            if (artefact.headUpdate != null && !File(update, artefact.file).isFile) {
                val own = try {
                    assets.open("bundle/${artefact.file}").use { it.readBytes() }
                } catch (e: java.io.IOException) {
                    throw BundleException("${artefact.file}: the app's own bundle has none to rebuild it from")
                }
                HeadUpdate.rebuild(update, artefact, own)
            }
        }
        updateDir = update
        return manifest
    }

    /** A file of the bundle in use (the head update's folder, or the app's assets); null if missing. */
    private fun openFile(name: String): java.io.InputStream? {
        val dir = updateDir ?: return try { assets.open("bundle/$name") } catch (e: java.io.IOException) { null }
        return File(dir, name).takeIf { it.isFile }?.inputStream()
    }

    /** Verify the artefact's bytes and contract, then load it (on the analysis thread). */
    private fun load(manifest: Manifest, artefact: Artefact) {
        backend?.close()
        backend = null
        try {
            val problems = BundleCheck.fileProblems(artefact, null) { openFile(artefact.file) } +
                BundleCheck.contractProblems(artefact, manifest)
            if (problems.isNotEmpty()) throw BundleException(problems.joinToString("; "))
            val loaded = when (artefact.format) {
                "tflite" -> LiteRtBackend(artefact, readModel(artefact.file), threads = 4)
                else -> ExecuTorchBackend(artefact, copyToFiles(artefact.file))
            }
            val mismatch = BundleCheck.outputSizeProblems(artefact, loaded.outputSize, manifest)
            if (mismatch.isNotEmpty()) {
                loaded.close()
                throw BundleException(mismatch.joinToString("; "))
            }
            backend = loaded
            runOnUiThread { error.visibility = View.GONE }
        } catch (e: Exception) {  // a bad bundle must not crash the app
            showError("${artefact.file}: ${e.message}")
        }
    }

    private fun startCamera() {
        val providerFuture = ProcessCameraProvider.getInstance(this)
        providerFuture.addListener({
            val provider = providerFuture.get()
            val preview = Preview.Builder().build().also {
                it.setSurfaceProvider(findViewById<PreviewView>(R.id.preview).surfaceProvider)
            }
            val frames = ImageAnalysis.Builder()
                .setBackpressureStrategy(ImageAnalysis.STRATEGY_KEEP_ONLY_LATEST)
                .setOutputImageFormat(ImageAnalysis.OUTPUT_IMAGE_FORMAT_RGBA_8888)
                .build().also { it.setAnalyzer(analysis, ::classify) }
            provider.unbindAll()
            provider.bindToLifecycle(this, CameraSelector.DEFAULT_BACK_CAMERA, preview, frames)
        }, ContextCompat.getMainExecutor(this))
    }

    private fun classify(frame: ImageProxy) {
        frame.use {
            val model = backend ?: return
            val m = manifest ?: return
            val bitmap = frame.toBitmap().let { b ->
                val degrees = frame.imageInfo.rotationDegrees
                if (degrees == 0) b else Bitmap.createBitmap(b, 0, 0, b.width, b.height,
                    android.graphics.Matrix().apply { postRotate(degrees.toFloat()) }, true)
            }
            val pixels = IntArray(bitmap.width * bitmap.height)
            bitmap.getPixels(pixels, 0, bitmap.width, 0, 0, bitmap.width, bitmap.height)
            val input = Preprocessor.toInput(pixels, bitmap.width, bitmap.height, m, model.artefact.inputs.single())
            val start = SystemClock.elapsedRealtimeNanos()
            val logits = model.run(input)
            val ms = (SystemClock.elapsedRealtimeNanos() - start) / 1e6
            val answer = Scores.answer(logits, m, k = 3, minConfidence = 0.5, latencyMs = ms)
            runOnUiThread { result.text = describe(answer) }
        }
    }

    private fun describe(answer: Answer): String = buildString {
        appendLine(if (answer.uncertain) "uncertain" else answer.label.uppercase())
        for (s in answer.topK) {
            appendLine("%-12s %5.1f%%  %s".format(s.name, s.probability * 100, s.stream ?: ""))
        }
        append("%.1f ms".format(answer.latencyMs))
    }

    private fun showError(message: String) {
        runOnUiThread {
            error.text = message
            error.visibility = View.VISIBLE
        }
    }

    private fun readModel(name: String): ByteBuffer {
        val bytes = openFile(name)?.use { it.readBytes() } ?: throw BundleException("$name: missing")
        return ByteBuffer.allocateDirect(bytes.size).order(ByteOrder.nativeOrder()).put(bytes).apply { rewind() }
    }

    private fun copyToFiles(name: String): File {
        val file = File(filesDir, name)
        val input = openFile(name) ?: throw BundleException("$name: missing")
        input.use { file.outputStream().use { out -> it.copyTo(out) } }
        return file
    }

    override fun onDestroy() {
        analysis.execute { backend?.close() }
        analysis.shutdown()
        super.onDestroy()
    }
}
