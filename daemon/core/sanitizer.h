/* sanitizer.h — which sanitizer this file is built under, one way for GCC
 * (its __SANITIZE_*__ macros) and clang (__has_feature): MT_ASAN under
 * AddressSanitizer, MT_TSAN under ThreadSanitizer. For code that tells the
 * sanitizer what it cannot see (poisoned gaps, switches of stacks) or that
 * allows for its slowness; never for behaviour a build without one lacks. */
#ifndef MT_SANITIZER_H
#define MT_SANITIZER_H

#if defined(__SANITIZE_ADDRESS__)
#define MT_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define MT_ASAN 1
#endif
#endif

#if defined(__SANITIZE_THREAD__)
#define MT_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define MT_TSAN 1
#endif
#endif

#endif
