plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

android {
    namespace = "org.trashsort.demo"
    compileSdk = 35
    defaultConfig {
        applicationId = "org.trashsort.demo"
        minSdk = 26
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    androidResources { noCompress += listOf("tflite", "pte") } // memory-mapped, not inflated
}

dependencies {
    implementation(project(":core"))
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.camera:camera-core:1.4.1")
    implementation("androidx.camera:camera-camera2:1.4.1")
    implementation("androidx.camera:camera-lifecycle:1.4.1")
    implementation("androidx.camera:camera-view:1.4.1")
    implementation("com.google.ai.edge.litert:litert:1.4.0")
    // The runtime should be no older than the exporter (executorch==1.4.1 in ../constraints.txt).
    implementation("org.pytorch:executorch-android:1.4.1")
}

// ./gradlew :app:copyBundle -Pbundle=../dist/trashnet-mobilenetv3_small-v1
// puts a bundle from `make export-mobile` (or `trashsort add-class`) into the app's assets.
tasks.register<Copy>("copyBundle") {
    val bundle = providers.gradleProperty("bundle")
    from(bundle.map { rootProject.file(it) }) {
        include("manifest.json", "labels.txt", "*.tflite", "*.pte")
    }
    into(layout.projectDirectory.dir("src/main/assets/bundle"))
    doFirst {
        require(bundle.isPresent) { "pass -Pbundle=PATH_TO_BUNDLE (a dist/<name>-v<version> folder)" }
        delete(layout.projectDirectory.dir("src/main/assets/bundle"))
    }
}
