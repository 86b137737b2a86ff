// Pure Kotlin/JVM: no Android dependency, so it is tested on any JVM (see ../test-jvm.sh).
plugins {
    id("org.jetbrains.kotlin.jvm")
}

kotlin { jvmToolchain(17) }

dependencies {
    compileOnly("org.json:json:20240303") // Android ships org.json; on a plain JVM the tests bring it
    testImplementation("org.json:json:20240303")
    testImplementation("junit:junit:4.13.2")
}

tasks.test {
    systemProperty("trashsort.golden", rootProject.file("build/golden").absolutePath)
}
