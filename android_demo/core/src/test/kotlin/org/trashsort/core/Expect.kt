package org.trashsort.core

/** The message of the BundleException [block] throws; fails the test if it throws none. */
fun expectBundleError(block: () -> Unit): String {
    try {
        block()
    } catch (e: BundleException) {
        return e.message!!
    }
    throw AssertionError("expected a BundleException")
}
