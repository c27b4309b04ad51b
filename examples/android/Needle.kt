package dev.needlec

import java.nio.ByteBuffer

/**
 * The model compiled by `needlec build --target aarch64-linux-android --name needle`, called
 * through the JNI wrapper `needle_jni.c` (linked with `libneedle.a` into `libneedle_jni.so`,
 * which goes into `src/main/jniLibs/arm64-v8a/`).
 *
 * One instance owns one workspace (a direct buffer of a few MB, allocated once): keep one per
 * thread, or share one (calls are serialized). Nothing else is allocated per call but the
 * answer's String.
 */
class Needle : AutoCloseable {
    /** One answer: [text] is what `needlec run` prints for the query. */
    data class Answer(
        val text: String,
        /** The first call's tool (its index in the build's tool list, see [toolName]), or -1. */
        val tool: Int,
        /**
         * Whether [text] is JSON. When false the model's text is passed through as the reference
         * does (tool names restored): do not hand it to a JSON parser.
         */
        val parsed: Boolean,
        /** `confidence < --escalate-below`: hand the request to a bigger model. */
        val escalate: Boolean,
        val confidence: Float,
        val choiceSteps: Int,
    )

    /** A status other than NEEDLE_OK (see needle.h): 3 invalid UTF-8, 4 query too long, ... */
    class NeedleException(val status: Int) : Exception("needle_call_ex failed with status $status")

    private var buffer: ByteBuffer? = ByteBuffer.allocateDirect(LAYOUT[0].toInt())
    private val result = IntArray(6)

    @Synchronized
    fun call(query: String): Answer {
        val buf = buffer ?: throw IllegalStateException("closed")
        val bytes = query.toByteArray(Charsets.UTF_8)
        if (bytes.size > LAYOUT[2]) throw NeedleException(STATUS_QUERY_TOO_LONG)
        buf.clear()
        buf.position(LAYOUT[1].toInt())
        buf.put(bytes)
        val status = nativeCall(buf, bytes.size, result)
        if (status != 0) throw NeedleException(status)
        val out = ByteArray(result[0])
        buf.clear()
        buf.get(out)
        return Answer(
            text = String(out, Charsets.UTF_8),
            tool = result[1],
            parsed = result[2] != 0,
            escalate = result[3] != 0,
            confidence = Float.fromBits(result[4]),
            choiceSteps = result[5],
        )
    }

    @Synchronized
    override fun close() {
        buffer = null
    }

    companion object {
        private const val STATUS_QUERY_TOO_LONG = 4

        init {
            System.loadLibrary("needle_jni")
        }

        /** Buffer bytes, query offset, max query bytes, max output bytes. */
        private val LAYOUT = LongArray(4).also { nativeLayout(it) }

        @JvmStatic private external fun nativeLayout(layout: LongArray)

        @JvmStatic private external fun nativeCall(buffer: ByteBuffer, queryLen: Int, result: IntArray): Int

        /** The tool's name as the app's tool list spells it, or null outside the list. */
        @JvmStatic external fun toolName(index: Int): String?
    }
}
