#include <emmintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
// layout: per column j, per group g of 32 k: 16 bytes, byte b: low nibble k=b, high nibble k=b+16
// xq: int16 per k, sx per group. y[j] = sum_g sx[g]*sw[g][j]*sum_k xq*q
void mv(const int16_t*xq,const float*sx,float*y,const uint8_t*w,const float*sw,int k,int n){
  int G=k/32;
  for(int j=0;j<n;j+=4){
    __m128 tot=_mm_setzero_ps();
    for(int g=0;g<G;g++){
      const int16_t*xg=xq+g*32;
      __m128i x0=_mm_loadu_si128((const __m128i*)xg),x1=_mm_loadu_si128((const __m128i*)(xg+8)),x2=_mm_loadu_si128((const __m128i*)(xg+16)),x3=_mm_loadu_si128((const __m128i*)(xg+24));
      __m128i acc[4];
      for(int c=0;c<4;c++){
        __m128i v=_mm_loadu_si128((const __m128i*)(w+((size_t)(j+c)*G+g)*16));
        __m128i lo=_mm_unpacklo_epi8(v,v), hi=_mm_unpackhi_epi8(v,v);
        __m128i k0=_mm_srai_epi16(_mm_slli_epi16(lo,12),12); // k0..7
        __m128i k16=_mm_srai_epi16(_mm_slli_epi16(lo,8),12); // k16..23
        __m128i k8=_mm_srai_epi16(_mm_slli_epi16(hi,12),12);
        __m128i k24=_mm_srai_epi16(_mm_slli_epi16(hi,8),12);
        __m128i a=_mm_add_epi32(_mm_add_epi32(_mm_madd_epi16(k0,x0),_mm_madd_epi16(k8,x1)),_mm_add_epi32(_mm_madd_epi16(k16,x2),_mm_madd_epi16(k24,x3)));
        acc[c]=a;
      }
      // transpose-add 4 accs -> 4 column sums
      __m128i t0=_mm_unpacklo_epi32(acc[0],acc[1]), t1=_mm_unpackhi_epi32(acc[0],acc[1]);
      __m128i t2=_mm_unpacklo_epi32(acc[2],acc[3]), t3=_mm_unpackhi_epi32(acc[2],acc[3]);
      __m128i s=_mm_add_epi32(_mm_add_epi32(_mm_unpacklo_epi64(t0,t2),_mm_unpackhi_epi64(t0,t2)),_mm_add_epi32(_mm_unpacklo_epi64(t1,t3),_mm_unpackhi_epi64(t1,t3)));
      __m128 sc=_mm_mul_ps(_mm_loadu_ps(sw+(size_t)g*n+j),_mm_set1_ps(sx[g]));
      tot=_mm_add_ps(tot,_mm_mul_ps(_mm_cvtepi32_ps(s),sc));
    }
    _mm_storeu_ps(y+j,tot);
  }
}
int main(int argc,char**argv){
  int k=512,n=512; int mats=atoi(argv[1]);
  size_t wb=(size_t)k*n/2; uint8_t*w=malloc(wb*mats); float*sw=malloc(sizeof(float)*k/32*n*mats);
  for(size_t i=0;i<wb*mats;i++)w[i]=rand(); for(size_t i=0;i<(size_t)k/32*n*mats;i++)sw[i]=0.01f;
  int16_t xq[512]; float sx[16],y[512]; for(int i=0;i<k;i++)xq[i]=(i*37)%32767-16000; for(int g=0;g<16;g++)sx[g]=1e-4f;
  double best=1e9;
  for(int rep=0;rep<5;rep++){ double t=now(); for(int it=0;it<200;it++) for(int m=0;m<mats;m++) mv(xq,sx,y,w+m*wb,sw+(size_t)m*k/32*n,k,n); t=now()-t; if(t<best)best=t;}
  double macs=200.0*mats*k*n; printf("int-dot mats=%d (%.1f MB) %.2f GMAC/s y0=%f\n",mats,wb*mats/1e6,macs/best/1e9,y[0]);
}
