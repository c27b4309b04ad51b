/*
 * JNI wrapper for a library built by `needlec build --target aarch64-linux-android --name needle`:
 * the native half of examples/android/Needle.kt (class dev.needlec.Needle).
 *
 * It calls no libc function at all: the Kotlin side allocates one direct ByteBuffer that holds the
 * output, the query and the workspace (nativeLayout says how big), and every JNI service goes
 * through the JNIEnv table. The linked shared object therefore has no undefined symbol and no
 * DT_NEEDED entry (the tests check both).
 *
 *   buffer: [0, MAX_OUTPUT_BYTES)                      the answer (UTF-8)
 *           [MAX_OUTPUT_BYTES, + MAX_QUERY_BYTES)      the query (UTF-8), written by Kotlin
 *           then the workspace, aligned up to NEEDLE_WORKSPACE_ALIGN inside the slack
 *
 * Build with the NDK (what the app's build does):
 *   $NDK/toolchains/llvm/prebuilt/linux-x86_64/bin/aarch64-linux-android24-clang -shared -fPIC \
 *       -O2 -Wl,-z,max-page-size=16384 -I out needle_jni.c out/libneedle.a -o libneedle_jni.so
 */
#include <jni.h>
#include <stdint.h>

#include "needle.h"

#define QUERY_OFFSET ((size_t)NEEDLE_MAX_OUTPUT_BYTES)
#define WORKSPACE_OFFSET (QUERY_OFFSET + (size_t)NEEDLE_MAX_QUERY_BYTES)
#define BUFFER_BYTES (WORKSPACE_OFFSET + (size_t)NEEDLE_WORKSPACE_ALIGN + (size_t)NEEDLE_WORKSPACE_SIZE)

/* Needle.nativeLayout(layout: LongArray): buffer bytes, query offset, max query bytes, max
   output bytes. */
JNIEXPORT void JNICALL Java_dev_needlec_Needle_nativeLayout(JNIEnv *env, jclass cls, jlongArray layout) {
    (void)cls;
    jlong v[4];
    v[0] = (jlong)BUFFER_BYTES;
    v[1] = (jlong)QUERY_OFFSET;
    v[2] = (jlong)NEEDLE_MAX_QUERY_BYTES;
    v[3] = (jlong)NEEDLE_MAX_OUTPUT_BYTES;
    (*env)->SetLongArrayRegion(env, layout, 0, 4, v);
}

/* Needle.nativeCall(buffer, queryLen, result: IntArray): the status (NEEDLE_OK, NEEDLE_ERR_*);
   result gets the answer's length, then needle_result's tool, parsed, escalate, the bits of
   confidence, and choice_steps. */
JNIEXPORT jint JNICALL Java_dev_needlec_Needle_nativeCall(JNIEnv *env, jclass cls, jobject buffer, jint query_len,
                                                         jintArray result) {
    (void)cls;
    uint8_t *base = (*env)->GetDirectBufferAddress(env, buffer);
    jlong cap = (*env)->GetDirectBufferCapacity(env, buffer);
    if (base == 0 || cap < (jlong)BUFFER_BYTES || query_len < 0 || (size_t)query_len > NEEDLE_MAX_QUERY_BYTES ||
        (*env)->GetArrayLength(env, result) < 6)
        return NEEDLE_ERR_ARGUMENT;
    uintptr_t ws = (uintptr_t)(base + WORKSPACE_OFFSET);
    ws = (ws + (NEEDLE_WORKSPACE_ALIGN - 1)) & ~(uintptr_t)(NEEDLE_WORKSPACE_ALIGN - 1);
    needle_result r;
    size_t out_len = 0;
    int32_t status = needle_call_ex((void *)ws, base + QUERY_OFFSET, (size_t)query_len, base, NEEDLE_MAX_OUTPUT_BYTES,
                                    &out_len, &r);
    union {
        float f;
        jint i;
    } confidence;
    confidence.f = r.confidence;
    jint v[6];
    v[0] = (jint)out_len;
    v[1] = r.tool;
    v[2] = r.parsed;
    v[3] = r.escalate;
    v[4] = confidence.i;
    v[5] = (jint)r.choice_steps;
    (*env)->SetIntArrayRegion(env, result, 0, 6, v);
    return status;
}

/* Needle.toolName(index): the tool's name as the app's tool list spells it, or null. Tool names
   are ASCII identifiers in practice; NewStringUTF reads modified UTF-8. */
JNIEXPORT jstring JNICALL Java_dev_needlec_Needle_toolName(JNIEnv *env, jclass cls, jint index) {
    (void)cls;
    const char *name = needle_tool_name(index);
    return name == 0 ? 0 : (*env)->NewStringUTF(env, name);
}
