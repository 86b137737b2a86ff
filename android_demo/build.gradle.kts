// Versions pinned here; build with Android Studio (Ladybug or newer) or `./gradlew :app:assembleDebug`.
plugins {
    id("com.android.application") version "8.7.3" apply false
    id("org.jetbrains.kotlin.android") version "2.1.0" apply false
    id("org.jetbrains.kotlin.jvm") version "2.1.0" apply false
}
