#!/usr/bin/env bash
# JVM tests of the Android core (no Android SDK needed): kotlinc from npm (kotlin-compiler), JUnit 4
# and Android's own org.json (libandroid-json-java) from Debian, golden vectors from the Python side.
# Prints "android core: N passed, N failed" and exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-../.venv/bin/python}
KOTLIN_VERSION=2.4.20
BUILD=build
TOOLS=$BUILD/tools

if [ ! -x "$TOOLS/node_modules/kotlin-compiler/bin/kotlinc" ]; then
  mkdir -p "$TOOLS"
  (cd "$TOOLS" && npm install --silent --no-audit --no-fund --prefix . "kotlin-compiler@$KOTLIN_VERSION" >/dev/null)
fi
KOTLINC=$TOOLS/node_modules/kotlin-compiler/bin/kotlinc
for jar in /usr/share/java/junit4.jar /usr/share/java/hamcrest-core.jar /usr/share/java/com.android.json.jar; do
  if [ ! -f "$jar" ]; then
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y -q junit4 libandroid-json-java >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q junit4 libandroid-json-java >/dev/null; }
    break
  fi
done
CP=/usr/share/java/junit4.jar:/usr/share/java/hamcrest-core.jar:/usr/share/java/com.android.json.jar

"$PYTHON" write_golden.py "$BUILD/golden" >/dev/null
"$KOTLINC" -nowarn -jvm-target 17 -cp "$CP" -d "$BUILD/core-tests.jar" \
  core/src/main/kotlin core/src/test/kotlin 2>&1 | grep -v "^warning: unable to find kotlin-stdlib.jar" || true
[ -f "$BUILD/core-tests.jar" ] || { echo "android core: compilation failed"; exit 1; }
(cd core/src/test/resources && jar uf "../../../../$BUILD/core-tests.jar" manifest.json)

STDLIB=$(dirname "$KOTLINC")/../lib/kotlin-stdlib.jar
TESTS=$(cd core/src/test/kotlin && find . -name '*Test.kt' | sed 's|^\./||; s|\.kt$||; s|/|.|g' | sort)
set +e
java -Dtrashsort.golden="$BUILD/golden" -cp "$BUILD/core-tests.jar:$STDLIB:$CP" org.junit.runner.JUnitCore $TESTS \
  > "$BUILD/junit.log" 2>&1
status=$?
set -e
cat "$BUILD/junit.log" | grep -v "^\s*at " | head -60
run=$(grep -oE "Tests run: [0-9]+" "$BUILD/junit.log" | grep -oE "[0-9]+" || true)
failed=$(grep -oE "Failures: [0-9]+" "$BUILD/junit.log" | grep -oE "[0-9]+" || echo 0)
if grep -qE "^OK \(([0-9]+) tests?\)" "$BUILD/junit.log"; then
  run=$(grep -oE "^OK \(([0-9]+)" "$BUILD/junit.log" | grep -oE "[0-9]+"); failed=0
fi
echo "android core: $(( ${run:-0} - ${failed:-0} )) passed, ${failed:-0} failed"
exit $status
