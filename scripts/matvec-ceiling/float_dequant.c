#include <emmintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
// int4 matvec, old panel layout: per panel of 8 cols, per row 4 bytes (byte j: col j low, col j+4 high)
// scales per group of 32 rows per col. y[n] = sum_k x[k] * q[k][n] * s[k/32][n]
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
void mv(const float*x,float*y,const uint8_t*w,const float*sc,int k,int n){
  for(int c=0;c<n;c+=16){
    const uint8_t*p0=w+(size_t)(c/8)*k*4, *p1=p0+(size_t)k*4;
    __m128 t0=_mm_setzero_ps(),t1=t0,t2=t0,t3=t0;
    for(int g=0;g<k/32;g++){
      __m128 a0=_mm_setzero_ps(),a1=a0,a2=a0,a3=a0;
      for(int r=g*32;r<g*32+32;r++){
        __m128 xs=_mm_set1_ps(x[r]);
        __m128i b0=_mm_cvtsi32_si128(*(const int*)(p0+r*4));
        __m128i b1=_mm_cvtsi32_si128(*(const int*)(p1+r*4));
        b0=_mm_unpacklo_epi8(b0,b0); b0=_mm_unpacklo_epi16(b0,b0); // byte in top of each 32-bit lane? 
        b1=_mm_unpacklo_epi8(b1,b1); b1=_mm_unpacklo_epi16(b1,b1);
        __m128i lo0=_mm_srai_epi32(_mm_slli_epi32(b0,28),28), hi0=_mm_srai_epi32(_mm_slli_epi32(b0,24),28);
        __m128i lo1=_mm_srai_epi32(_mm_slli_epi32(b1,28),28), hi1=_mm_srai_epi32(_mm_slli_epi32(b1,24),28);
        a0=_mm_add_ps(a0,_mm_mul_ps(xs,_mm_cvtepi32_ps(lo0)));
        a1=_mm_add_ps(a1,_mm_mul_ps(xs,_mm_cvtepi32_ps(hi0)));
        a2=_mm_add_ps(a2,_mm_mul_ps(xs,_mm_cvtepi32_ps(lo1)));
        a3=_mm_add_ps(a3,_mm_mul_ps(xs,_mm_cvtepi32_ps(hi1)));
      }
      const float*s=sc+(size_t)g*n+c;
      t0=_mm_add_ps(t0,_mm_mul_ps(a0,_mm_loadu_ps(s)));
      t1=_mm_add_ps(t1,_mm_mul_ps(a1,_mm_loadu_ps(s+4)));
      t2=_mm_add_ps(t2,_mm_mul_ps(a2,_mm_loadu_ps(s+8)));
      t3=_mm_add_ps(t3,_mm_mul_ps(a3,_mm_loadu_ps(s+12)));
    }
    _mm_storeu_ps(y+c,t0);_mm_storeu_ps(y+c+4,t1);_mm_storeu_ps(y+c+8,t2);_mm_storeu_ps(y+c+12,t3);
  }
}
int main(int argc,char**argv){
  int k=512,n=512; int mats=atoi(argv[1]); // number of distinct matrices (working set)
  size_t wb=(size_t)k*n/2; uint8_t*w=malloc(wb*mats); float*sc=malloc(sizeof(float)*k/32*n*mats);
  for(size_t i=0;i<wb*mats;i++)w[i]=rand(); for(size_t i=0;i<(size_t)k/32*n*mats;i++)sc[i]=0.01f;
  float x[512],y[512]; for(int i=0;i<k;i++)x[i]=i*0.001f;
  int iters=4000/ (mats<1?1:1);
  double best=1e9;
  for(int rep=0;rep<5;rep++){ double t=now(); for(int it=0;it<200;it++) for(int m=0;m<mats;m++) mv(x,y,w+m*wb,sc+(size_t)m*k/32*n,k,n); t=now()-t; if(t<best)best=t;}
  double macs=200.0*mats*k*n; printf("mats=%d (%.1f MB) %.2f GMAC/s y0=%f\n",mats,wb*mats/1e6,macs/best/1e9,y[0]);
}
